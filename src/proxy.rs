//! Which proxy each URL goes through, decided once before the run: `--proxy`
//! for every URL, else the environment variables curl reads (`http_proxy`,
//! `https_proxy`, `all_proxy`, `no_proxy`, lower case first, then upper
//! case). Hosts on `--noproxy` (else `no_proxy`) are fetched directly.
//!
//! A proxy jobrun cannot use is an error before any request, naming where it
//! came from: left to the HTTP client, an unknown scheme is either skipped
//! in silence (so requests go out directly) or fails every URL, one retry
//! after another.

use reqwest::{ClientBuilder, NoProxy, Proxy, Url};

/// A proxy jobrun cannot use, named by where it was given.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not a proxy URL jobrun speaks.
    #[error("{0}")]
    Invalid(String),
    /// One the HTTP client refused.
    #[error("{given}: unusable proxy")]
    Unusable {
        given: String,
        #[source]
        source: reqwest::Error,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// The proxy schemes jobrun speaks: HTTP forwarding or CONNECT, over plain
/// TCP or TLS, and SOCKS5 (resolving host names locally or, with
/// `socks5h`, at the proxy).
const SCHEMES: [&str; 4] = ["http", "https", "socks5", "socks5h"];

/// The proxies for a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Proxies {
    /// For `http://` URLs.
    http: Option<ProxyUrl>,
    /// For `https://` URLs.
    https: Option<ProxyUrl>,
    /// Hosts and domains fetched directly, comma-separated.
    bypass: Option<String>,
}

/// A checked proxy URL and where it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProxyUrl {
    url: Url,
    source: String,
}

impl Proxies {
    /// From `--proxy` and `--noproxy`, and the process's environment.
    pub fn from_options(proxy: Option<&str>, noproxy: Option<&str>) -> Result<Proxies> {
        Proxies::resolve(proxy, noproxy, |name| std::env::var(name).ok())
    }

    /// From the options and an environment given as a lookup function.
    fn resolve(
        proxy: Option<&str>,
        noproxy: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Proxies> {
        let from_env = |names: &[&'static str]| {
            names.iter().find_map(|&name| {
                env(name)
                    .filter(|value| !value.trim().is_empty())
                    .map(|value| (value, format!("the environment variable {name}")))
            })
        };
        let bypass = match noproxy {
            Some(list) => Some(list.to_string()),
            None => from_env(&["no_proxy", "NO_PROXY"]).map(|(list, _)| list),
        };
        // `*` turns every proxy off, also one that could not be used.
        if bypass.as_deref().is_some_and(|list| list.trim() == "*") {
            return Ok(Proxies::default());
        }
        if let Some(proxy) = proxy {
            let proxy = ProxyUrl::parse(proxy, "--proxy".into())?;
            return Ok(Proxies {
                http: Some(proxy.clone()),
                https: Some(proxy),
                bypass,
            });
        }
        // Under CGI a request's `Proxy:` header arrives as HTTP_PROXY, so
        // the upper-case name is not trusted there (as curl does).
        let http_names: &[&str] = if env("REQUEST_METHOD").is_some() {
            &["http_proxy"]
        } else {
            &["http_proxy", "HTTP_PROXY"]
        };
        let all = from_env(&["all_proxy", "ALL_PROXY"]);
        let pick = |names: &[&'static str]| -> Result<Option<ProxyUrl>> {
            match from_env(names).or_else(|| all.clone()) {
                Some((value, source)) => Ok(Some(ProxyUrl::parse(&value, source)?)),
                None => Ok(None),
            }
        };
        Ok(Proxies {
            http: pick(http_names)?,
            https: pick(&["https_proxy", "HTTPS_PROXY"])?,
            bypass,
        })
    }

    /// Sets the client's proxies; without any, the client goes direct and
    /// does not read the environment again on its own.
    pub fn apply(self, builder: ClientBuilder) -> Result<ClientBuilder> {
        if self.http.is_none() && self.https.is_none() {
            return Ok(builder.no_proxy());
        }
        let bypass = self.bypass.as_deref().and_then(NoProxy::from_string);
        let mut builder = builder;
        for (proxy, make) in [
            (
                self.http,
                Proxy::http::<Url> as fn(Url) -> reqwest::Result<Proxy>,
            ),
            (self.https, Proxy::https::<Url>),
        ] {
            let Some(proxy) = proxy else { continue };
            let made = make(proxy.url).map_err(|source| Error::Unusable {
                given: proxy.source,
                source,
            })?;
            builder = builder.proxy(made.no_proxy(bypass.clone()));
        }
        Ok(builder)
    }
}

/// A proxy as given, with its user name and password (if any) replaced by
/// `…`, for what jobrun records and prints.
pub fn redact(text: &str) -> String {
    match ProxyUrl::normalise(text) {
        Some(url) if !url.username().is_empty() || url.password().is_some() => {
            let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "{}://…@{}{port}",
                url.scheme(),
                url.host_str().unwrap_or("")
            )
        }
        Some(_) => text.to_string(),
        None if text.contains('@') => "…".into(),
        None => text.to_string(),
    }
}

impl ProxyUrl {
    /// `host:port` without a scheme means HTTP, as with curl.
    fn normalise(text: &str) -> Option<Url> {
        let text = text.trim();
        if text.contains("://") {
            Url::parse(text).ok()
        } else {
            Url::parse(&format!("http://{text}")).ok()
        }
    }

    /// Checks a proxy as given. Messages leave the value out, as it may hold
    /// a password.
    fn parse(text: &str, source: String) -> Result<ProxyUrl> {
        let Some(url) = ProxyUrl::normalise(text) else {
            return Err(Error::Invalid(format!(
                "{source}: not a proxy URL like http://proxy.example:3128 or \
                 socks5h://proxy.example:1080"
            )));
        };
        let scheme = url.scheme();
        if !SCHEMES.contains(&scheme) {
            return Err(Error::Invalid(format!(
                "{source}: proxy scheme {scheme:?} is not supported (use {}){}",
                SCHEMES.join(", "),
                if source.starts_with("--") {
                    ""
                } else {
                    "; unset it, or override it with --proxy URL or --noproxy '*'"
                }
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::Invalid(format!(
                "{source}: the proxy URL has no host"
            )));
        }
        Ok(ProxyUrl { url, source })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn resolve(
        proxy: Option<&str>,
        noproxy: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Proxies> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Proxies::resolve(proxy, noproxy, |name| env.get(name).cloned())
    }

    fn urls(proxies: &Proxies) -> (Option<String>, Option<String>) {
        let url = |p: &Option<ProxyUrl>| p.as_ref().map(|p| p.url.to_string());
        (url(&proxies.http), url(&proxies.https))
    }

    #[test]
    fn the_option_wins_over_the_environment() {
        let proxies = resolve(
            Some("socks5h://127.0.0.1:1080"),
            None,
            &[("ALL_PROXY", "ftp://ignored"), ("http_proxy", "http://h:1")],
        )
        .unwrap();
        let socks = Some("socks5h://127.0.0.1:1080".to_string());
        assert_eq!(urls(&proxies), (socks.clone(), socks));
        assert_eq!(proxies.http.unwrap().source, "--proxy");
    }

    #[test]
    fn the_environment_is_read_lower_case_first_with_all_proxy_as_fallback() {
        let proxies = resolve(
            None,
            None,
            &[
                ("http_proxy", "http://lower:1"),
                ("HTTP_PROXY", "http://upper:1"),
                ("ALL_PROXY", "socks5://all:2"),
            ],
        )
        .unwrap();
        assert_eq!(
            urls(&proxies),
            (
                Some("http://lower:1/".to_string()),
                Some("socks5://all:2".to_string())
            )
        );
        let upper = resolve(
            None,
            None,
            &[("HTTPS_PROXY", "proxy:3128"), ("https_proxy", "")],
        )
        .unwrap();
        assert_eq!(upper.https.unwrap().url.as_str(), "http://proxy:3128/");
        assert_eq!(upper.http, None);
    }

    #[test]
    fn upper_case_http_proxy_is_ignored_under_cgi() {
        let proxies = resolve(
            None,
            None,
            &[
                ("HTTP_PROXY", "http://from-a-header:1"),
                ("REQUEST_METHOD", "GET"),
            ],
        )
        .unwrap();
        assert_eq!(proxies.http, None);
    }

    #[test]
    fn noproxy_comes_from_the_option_else_the_environment_and_star_turns_all_off() {
        let proxies = resolve(
            None,
            Some("a.example"),
            &[("all_proxy", "http://p:1"), ("NO_PROXY", "b")],
        )
        .unwrap();
        assert_eq!(proxies.bypass.as_deref(), Some("a.example"));
        let proxies = resolve(
            None,
            None,
            &[("all_proxy", "http://p:1"), ("NO_PROXY", "b")],
        )
        .unwrap();
        assert_eq!(proxies.bypass.as_deref(), Some("b"));
        let off = resolve(
            None,
            None,
            &[("ALL_PROXY", "ftp://p:1"), ("no_proxy", " * ")],
        )
        .unwrap();
        assert_eq!(off, Proxies::default());
    }

    #[test]
    fn unusable_proxies_are_refused_naming_where_they_came_from_and_never_their_password() {
        for (proxy, env, expected) in [
            (
                Some("gopher://u:s3cret@p:70"),
                &[][..],
                "--proxy: proxy scheme \"gopher\" is not supported (use http, https, socks5, socks5h)",
            ),
            (
                None,
                &[("ALL_PROXY", "ftp://u:s3cret@p:21")][..],
                "the environment variable ALL_PROXY: proxy scheme \"ftp\" is not supported",
            ),
            (
                None,
                &[("https_proxy", "socks4://p:1080")][..],
                "the environment variable https_proxy: proxy scheme \"socks4\"",
            ),
            (
                Some("http://u:s3cret@:80"),
                &[][..],
                "--proxy: not a proxy URL",
            ),
            (Some("http:// s3cret"), &[][..], "--proxy: not a proxy URL"),
        ] {
            let err = resolve(proxy, None, env).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn redacted_proxies_keep_no_credentials() {
        assert_eq!(redact("http://u:pw@proxy:3128"), "http://…@proxy:3128");
        assert_eq!(redact("u:pw@proxy:3128"), "http://…@proxy:3128");
        assert_eq!(redact("socks5h://u@proxy"), "socks5h://…@proxy");
        assert_eq!(redact("http://proxy:3128"), "http://proxy:3128");
        assert_eq!(redact("http://u:pw@ bad"), "…");
    }

    #[test]
    fn every_supported_scheme_builds_a_client() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        for scheme in SCHEMES {
            let proxies = resolve(
                Some(&format!("{scheme}://127.0.0.1:9")),
                Some("localhost"),
                &[],
            )
            .unwrap();
            let builder = proxies.apply(reqwest::Client::builder()).unwrap();
            builder.build().unwrap();
        }
    }
}
