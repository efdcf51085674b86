//! Reading a URL list, streamed so that memory does not grow with the
//! file: either one URL per line, or JSON Lines with a request and a file
//! name per line. Each line is skipped (blank, `#` comment), an entry, or
//! rejected with a reason the user can act on.

use std::collections::BTreeMap;
use std::io::{self, BufRead};
use std::ops::Range;

use reqwest::Url;
use serde::Deserialize;

use crate::output::check_output_name;
use crate::request::RequestSpec;

/// Lines longer than this are rejected rather than read into memory.
pub const MAX_LINE: usize = 64 * 1024;

/// A line longer than this ends the reading: such input is no list of
/// URLs (a binary file, or a device such as `/dev/zero` that never ends a
/// line), and skipping it could go on for ever.
pub const MAX_SKIPPED_LINE: u64 = 64 * 1024 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Skip,
    Entry(Entry),
    Reject(String),
}

/// One job from the list.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub url: Url,
    /// What to send when it is not a plain GET.
    pub request: Option<RequestSpec>,
    /// The output file name, relative to the output folder, when given.
    pub name: Option<String>,
}

/// How the lines of a list are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One URL per line.
    Lines,
    /// One JSON object per line: `{"url": ..., "method": ..., "headers": ...,
    /// "body": ..., "name": ...}`.
    JsonLines,
}

impl Format {
    /// Guesses the format from the first line that is not blank or a comment.
    pub fn detect(raw: &[u8]) -> Option<Format> {
        let raw = raw.strip_prefix(BOM).unwrap_or(raw);
        let text = String::from_utf8_lossy(raw);
        let text = text.trim();
        if text.is_empty() || text.starts_with('#') {
            None
        } else if text.starts_with('{') {
            Some(Format::JsonLines)
        } else {
            Some(Format::Lines)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    url: String,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<serde_json::Value>,
    name: Option<String>,
}

/// Reads the next line into `buf` (without its end), reading at most
/// `MAX_LINE` bytes of it. Returns None at the end of the input, and
/// Some(false) for a line that was too long (the rest of it is skipped).
/// A line longer than `MAX_SKIPPED_LINE` is an error of kind `InvalidData`.
pub fn read_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let read = io::Read::take(&mut *reader, MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if read == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(true));
    }
    if buf.len() <= MAX_LINE {
        return Ok(Some(true)); // the last line, without a newline
    }
    // Too long: skip to the end of the line without keeping it.
    let mut skipped = buf.len() as u64;
    loop {
        if skipped > MAX_SKIPPED_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "no line end in the first {} MiB of this line: this is not a list of URLs \
                     (a binary file, or a device such as /dev/zero?); give a text file with \
                     one URL or JSON request per line",
                    MAX_SKIPPED_LINE / (1024 * 1024)
                ),
            ));
        }
        let (skip, found) = {
            let available = reader.fill_buf()?;
            match available.iter().position(|&b| b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), available.is_empty()),
            }
        };
        reader.consume(skip);
        skipped += skip as u64;
        if found {
            return Ok(Some(false));
        }
    }
}

/// Classifies one line (without its line end). `first` strips a UTF-8 BOM.
pub fn parse_line(raw: &[u8], first: bool, format: Format) -> Line {
    let raw = if first {
        raw.strip_prefix(BOM).unwrap_or(raw)
    } else {
        raw
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return Line::Reject("not valid UTF-8".into());
    };
    let text = text.trim();
    if text.is_empty() || text.starts_with('#') {
        return Line::Skip;
    }
    let entry = match format {
        Format::Lines => parse_url(text).map(|url| Entry {
            url,
            request: None,
            name: None,
        }),
        Format::JsonLines => parse_json(text),
    };
    match entry {
        Ok(entry) => Line::Entry(entry),
        Err(reason) => Line::Reject(reason),
    }
}

fn parse_json(text: &str) -> Result<Entry, String> {
    let line: JsonLine =
        serde_json::from_str(text).map_err(|e| format!("not a JSON request: {e}"))?;
    let url = parse_url(line.url.trim())?;
    let body = line.body.map(|body| match body {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    });
    let request = RequestSpec {
        method: line.method,
        headers: line.headers,
        body,
    };
    request.check()?;
    if let Some(name) = &line.name {
        check_name(name)?;
    }
    let request = (!request.is_plain_get()).then_some(request);
    Ok(Entry {
        url,
        request,
        name: line.name,
    })
}

/// Checks a `name` from JSON Lines: a file name inside the output folder,
/// without control characters, which would make file listings, `export`
/// and the terminal show something else than the name.
fn check_name(name: &str) -> Result<(), String> {
    if name.chars().any(char::is_control) {
        return Err(format!(
            "\"name\" {name:?} contains a control character (newline, tab, ...), \
             which a file name here must not"
        ));
    }
    check_output_name(name).map_err(|why| format!("\"name\" {why}"))
}

/// Parses a URL as written. The fragment (`#...`) is dropped: it is never
/// sent, so `http://a/x#1` and `http://a/x#2` are one job.
fn parse_url(text: &str) -> Result<Url, String> {
    // The url crate quietly drops tabs and line breaks inside a URL; a URL
    // that is not what it looks like is refused instead.
    if text.chars().any(char::is_control) {
        return Err("the URL contains a control character (a tab, ...)".into());
    }
    let mut url = Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "unsupported scheme \"{other}\" (only http and https URLs are fetched)"
            ));
        }
    }
    // The url crate reads `http:///x` and `http:/x` as `http://x/`: a host
    // nobody wrote. The text itself must have `//` and a host after it.
    let after_scheme = text.split_once(':').map_or("", |(_, rest)| rest);
    let authority = after_scheme.strip_prefix("//");
    if url.host_str().is_none_or(str::is_empty)
        || authority.is_none_or(|rest| rest.is_empty() || rest.starts_with(['/', '\\']))
    {
        return Err(format!(
            "the URL has no host: it must start with {}://HOST",
            url.scheme()
        ));
    }
    url.set_fragment(None);
    Ok(url)
}

/// Where the host of an http(s) URL is in its text, with its port if one
/// is given: the part between `://` and the path, less a user name and
/// password (`@` cannot appear unescaped in them, nor `/`).
pub fn host_range(url: &Url) -> Range<usize> {
    let text = url.as_str();
    // The scheme ends the text's first part: no search for `://` needed.
    let scheme = url.scheme().len();
    let start = if text[scheme..].starts_with("://") {
        scheme + 3
    } else {
        text.find("://").map_or(0, |at| at + 3)
    };
    let end = text[start..].find('/').map_or(text.len(), |at| start + at);
    let start = text[start..end]
        .rfind('@')
        .map_or(start, |at| start + at + 1);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Line {
        Line::Entry(Entry {
            url: Url::parse(text).unwrap(),
            request: None,
            name: None,
        })
    }

    fn parse_line(raw: &[u8], first: bool) -> Line {
        super::parse_line(raw, first, Format::Lines)
    }

    fn json(raw: &str) -> Result<Entry, String> {
        match super::parse_line(raw.as_bytes(), false, Format::JsonLines) {
            Line::Entry(entry) => Ok(entry),
            Line::Reject(reason) => Err(reason),
            Line::Skip => Err("skipped".into()),
        }
    }

    #[test]
    fn json_lines_carry_a_request_and_a_name() {
        let entry = json(
            r#"{"url": "https://a.test/orders", "method": "POST", "headers": {"X-K": "v"},
                "body": {"id": 17}, "name": "orders/17.json"}"#,
        )
        .unwrap();
        let request = entry.request.unwrap();
        assert_eq!(request.method.as_deref(), Some("POST"));
        assert_eq!(request.body.as_deref(), Some(r#"{"id":17}"#));
        assert_eq!(request.headers["X-K"], "v");
        assert_eq!(entry.name.as_deref(), Some("orders/17.json"));
        let plain = json(r#"{"url": "http://a.test/x", "body": "raw text"}"#).unwrap();
        assert_eq!(plain.request.unwrap().body.as_deref(), Some("raw text"));
        assert_eq!(json(r#"{"url": "http://a.test/x"}"#).unwrap().request, None);
    }

    #[test]
    fn bad_json_lines_say_why() {
        for (line, reason) in [
            ("{", "not a JSON request"),
            (r#"{"method": "GET"}"#, "missing field `url`"),
            (
                r#"{"url": "http://a.test/", "extra": 1}"#,
                "unknown field `extra`",
            ),
            (r#"{"url": "ftp://a.test/"}"#, "unsupported scheme"),
            (
                r#"{"url": "http://a.test/", "name": "../x"}"#,
                "stay inside the output folder",
            ),
            (
                r#"{"url": "http://a.test/", "method": "G T"}"#,
                "not an HTTP method",
            ),
        ] {
            let error = json(line).unwrap_err();
            assert!(error.contains(reason), "{line}: {error}");
        }
    }

    #[test]
    fn the_host_range_is_the_host_and_the_port_as_written() {
        for (text, host) in [
            ("http://a.example/x", "a.example"),
            ("https://A.Example:8443/x?y=/z", "a.example:8443"),
            ("http://a.example:80/", "a.example"),
            ("http://u:p%40@a.example:81/x@y", "a.example:81"),
            ("http://[::1]:8080/", "[::1]:8080"),
            ("http://b\u{fc}cher.example?q", "xn--bcher-kva.example"),
        ] {
            let url = Url::parse(text).unwrap();
            let expected = match url.port() {
                Some(port) => format!("{}:{port}", url.host_str().unwrap()),
                None => url.host_str().unwrap().to_string(),
            };
            assert_eq!(expected, host, "{text}");
            assert_eq!(&url.as_str()[host_range(&url)], host, "{text}");
        }
    }

    #[test]
    fn fragments_are_dropped_and_a_missing_host_is_not_guessed() {
        assert_eq!(
            parse_line(b"http://a.test/x#1", false),
            url("http://a.test/x")
        );
        assert_eq!(
            parse_line(b"https://a.test/x?q=1#f", false),
            url("https://a.test/x?q=1")
        );
        for text in [
            "http:///x",
            "http:/x",
            "http:x",
            "http:////x",
            "https:\\\\x",
        ] {
            match parse_line(text.as_bytes(), false) {
                Line::Reject(reason) => assert!(reason.contains("has no host"), "{text}: {reason}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_line(b"http://a.te\tst/", false),
            Line::Reject(_)
        ));
        let entry = json(r#"{"url": "http://a.test/x#frag", "name": "x"}"#).unwrap();
        assert_eq!(entry.url.as_str(), "http://a.test/x");
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        for name in [
            "a\\nb",
            "a\\tb",
            "a\\u0000b",
            "a\\u007fb",
            "a\\u0085b",
            "a\\u009bb",
        ] {
            let line = format!(r#"{{"url": "http://a.test/", "name": "{name}"}}"#);
            let error = json(&line).unwrap_err();
            assert!(error.contains("control character"), "{line}: {error}");
        }
        assert!(json(r#"{"url": "http://a.test/", "name": "caf\u00e9/ok.json"}"#).is_ok());
    }

    #[test]
    fn the_format_is_detected_from_the_first_entry() {
        assert_eq!(Format::detect(b"  # comment"), None);
        assert_eq!(Format::detect(b""), None);
        assert_eq!(
            Format::detect(b"\xEF\xBB\xBF{\"url\": 1}"),
            Some(Format::JsonLines)
        );
        assert_eq!(Format::detect(b"http://a.test/"), Some(Format::Lines));
    }

    #[test]
    fn whitespace_crlf_bom_and_comments_are_tolerated() {
        assert_eq!(
            parse_line(b"\xEF\xBB\xBFhttp://a.test/x\r", true),
            url("http://a.test/x")
        );
        assert_eq!(
            parse_line(b"  https://a.test/y  \t", false),
            url("https://a.test/y")
        );
        assert_eq!(parse_line(b"", false), Line::Skip);
        assert_eq!(parse_line(b"   \r", false), Line::Skip);
        assert_eq!(parse_line(b"# a comment", false), Line::Skip);
        assert_eq!(parse_line(b"  # indented comment", false), Line::Skip);
    }

    #[test]
    fn bad_lines_say_why() {
        let reason = |raw: &[u8]| match parse_line(raw, false) {
            Line::Reject(reason) => reason,
            other => panic!("{other:?} accepted"),
        };
        assert!(reason(b"ftp://a.test/f").starts_with("unsupported scheme \"ftp\""));
        assert!(reason(b"file:///etc/passwd").starts_with("unsupported scheme \"file\""));
        assert!(reason(b"a.test/no-scheme").starts_with("not a URL"));
        assert!(reason(b"http://").starts_with("not a URL"));
        assert_eq!(reason(b"http://a.test/\xff"), "not valid UTF-8");
        assert!(matches!(
            parse_line(b"\xEF\xBB\xBFhttp://a.test/", false),
            Line::Reject(_)
        ));
    }

    #[test]
    fn long_lines_are_skipped_without_being_kept() {
        let mut input = vec![b'x'; MAX_LINE * 3];
        input.extend_from_slice(b"\nhttp://a.test/\nlast");
        let mut reader = io::BufReader::with_capacity(1024, &input[..]);
        let mut buf = Vec::new();
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(false));
        assert!(buf.len() <= MAX_LINE + 1);
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"http://a.test/");
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(true));
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut reader, &mut buf).unwrap(), None);
    }

    mod never_panics {
        use proptest::prelude::*;

        use super::*;

        /// Bytes that look like URL lists often enough to reach every branch:
        /// schemes, hosts, BOMs, comments, line ends and invalid UTF-8.
        fn url_list_bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(b"http://".to_vec()),
                Just(b"https://".to_vec()),
                Just(b"ftp://".to_vec()),
                Just(b"a.test".to_vec()),
                Just(b"/p?q=1#f".to_vec()),
                Just(b"\xEF\xBB\xBF".to_vec()),
                Just(b"#".to_vec()),
                Just(b"\r\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b" \t".to_vec()),
                Just(b"[::1]:99999".to_vec()),
                Just(b"u:p@".to_vec()),
                Just(b":8080".to_vec()),
                Just(b"%zz\xff\xfe".to_vec()),
                prop::collection::vec(any::<u8>(), 0..16),
            ];
            prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
        }

        /// Every line `read_line` gives, all of them complete.
        fn read_all(reader: &mut impl BufRead) -> Vec<Vec<u8>> {
            let mut buf = Vec::new();
            let mut lines = Vec::new();
            while let Some(complete) = read_line(reader, &mut buf).unwrap() {
                assert!(complete, "a short line read as too long");
                lines.push(buf.clone());
            }
            lines
        }

        /// The lines of `input` (without their `\n`), as a reader sees them.
        fn lines_of(input: &[u8]) -> Vec<Vec<u8>> {
            let mut lines: Vec<Vec<u8>> =
                input.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            if input.is_empty() || input.ends_with(b"\n") {
                lines.pop();
            }
            lines
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn parse_line_accepts_only_http_urls_with_a_host(
                raw in url_list_bytes(),
                first in any::<bool>(),
            ) {
                for format in [Format::Lines, Format::JsonLines] {
                    match super::super::parse_line(&raw, first, format) {
                        Line::Entry(entry) => {
                            prop_assert!(matches!(entry.url.scheme(), "http" | "https"));
                            prop_assert!(entry.url.host_str().is_some_and(|h| !h.is_empty()));
                            let host = entry.url.host_str().unwrap_or_default();
                            let host = match entry.url.port() {
                                Some(port) => format!("{host}:{port}"),
                                None => host.to_string(),
                            };
                            prop_assert_eq!(&entry.url.as_str()[host_range(&entry.url)], host);
                        }
                        Line::Reject(reason) => prop_assert!(!reason.is_empty()),
                        Line::Skip => {}
                    }
                }
            }

            #[test]
            fn read_line_gives_back_every_line(
                input in url_list_bytes(),
                capacity in 1usize..64,
            ) {
                let mut reader = io::BufReader::with_capacity(capacity, &input[..]);
                prop_assert_eq!(read_all(&mut reader), lines_of(&input));
            }

            #[test]
            fn read_line_skips_overlong_lines_whole(
                long in (MAX_LINE + 1)..(MAX_LINE + 4096),
                after in url_list_bytes(),
            ) {
                let mut input = vec![b'x'; long];
                input.push(b'\n');
                input.extend_from_slice(&after);
                let mut reader = io::BufReader::with_capacity(4096, &input[..]);
                let mut buf = Vec::new();
                prop_assert_eq!(read_line(&mut reader, &mut buf).unwrap(), Some(false));
                prop_assert!(buf.len() <= MAX_LINE + 1);
                prop_assert_eq!(read_all(&mut reader), lines_of(&after));
            }
        }
    }
}
