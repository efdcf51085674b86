//! Which HTTP statuses are worth another attempt: by default the ones a
//! server sends when it is busy or briefly broken, or the list given with
//! `--retry-on`, which replaces the default (the word `default` in it stands
//! for the default list, so `default,404` adds to it).

/// The statuses retried unless `--retry-on` says otherwise: timeouts,
/// "too early", rate limits and the 5xx that mean "try again".
pub const DEFAULT_RETRY_STATUSES: [u16; 7] = [408, 425, 429, 500, 502, 503, 504];

/// A set of HTTP statuses that are retried; every other non-2xx status
/// fails its URL at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryStatuses(Vec<u16>);

impl Default for RetryStatuses {
    fn default() -> RetryStatuses {
        RetryStatuses(DEFAULT_RETRY_STATUSES.to_vec())
    }
}

impl std::fmt::Display for RetryStatuses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let words: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&words.join(","))
    }
}

impl RetryStatuses {
    /// Parses `429,503`, `default,404` or `default`: comma-separated 4xx and
    /// 5xx statuses, and the word `default` for the default list.
    pub fn parse(text: &str) -> Result<RetryStatuses, String> {
        let mut statuses = Vec::new();
        for word in text.split(',').map(str::trim) {
            if word.eq_ignore_ascii_case("default") {
                statuses.extend(DEFAULT_RETRY_STATUSES);
                continue;
            }
            let status: u16 = word.parse().map_err(|_| {
                format!(
                    "{word:?} is not an HTTP status: give a comma-separated list such as \
                     429,503 or default,404"
                )
            })?;
            if !(400..=599).contains(&status) {
                return Err(format!(
                    "{status} cannot be retried: only 4xx and 5xx statuses can (2xx bodies are \
                     saved, redirects are followed)"
                ));
            }
            statuses.push(status);
        }
        statuses.sort_unstable();
        statuses.dedup();
        Ok(RetryStatuses(statuses))
    }

    /// Whether a response with `status` is retried.
    pub fn contains(&self, status: u16) -> bool {
        self.0.contains(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_list_of_busy_statuses() {
        let default = RetryStatuses::default();
        for status in [408, 425, 429, 500, 502, 503, 504] {
            assert!(default.contains(status), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 501, 505] {
            assert!(!default.contains(status), "{status}");
        }
    }

    #[test]
    fn a_list_replaces_the_default_and_default_adds_to_it() {
        let only = RetryStatuses::parse("404, 503").unwrap();
        assert!(only.contains(404) && only.contains(503));
        assert!(!only.contains(429), "a list replaces the default");

        let more = RetryStatuses::parse("default,404").unwrap();
        assert!(more.contains(404) && more.contains(429) && more.contains(504));
        assert_eq!(
            RetryStatuses::parse("DEFAULT"),
            Ok(RetryStatuses::default())
        );
    }

    #[test]
    fn statuses_that_cannot_be_retried_are_refused_with_a_reason() {
        for (text, reason) in [
            ("", "not an HTTP status"),
            ("429,", "not an HTTP status"),
            ("busy", "not an HTTP status"),
            ("200", "only 4xx and 5xx"),
            ("301", "only 4xx and 5xx"),
            ("600", "only 4xx and 5xx"),
            ("99999", "not an HTTP status"),
        ] {
            let err = RetryStatuses::parse(text).unwrap_err();
            assert!(err.contains(reason), "{text:?}: {err}");
        }
    }
}
