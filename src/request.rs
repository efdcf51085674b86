//! What to send for a URL when it is more than a plain GET: a method,
//! headers and a body, as given on a JSON Lines import. Stored with the row
//! as JSON, checked once at import so that a run never meets a request it
//! cannot build.

use std::collections::BTreeMap;

use reqwest::Method;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl RequestSpec {
    /// A GET without headers or body: stored as no request at all.
    pub fn is_plain_get(&self) -> bool {
        self.method.as_deref().is_none_or(|m| m == "GET")
            && self.headers.is_empty()
            && self.body.is_none()
    }

    /// Checks that the request can be sent; the message names the part
    /// that cannot (never a header's value, which may be a secret).
    pub fn check(&self) -> Result<(), String> {
        if let Some(method) = &self.method {
            Method::from_bytes(method.as_bytes())
                .map_err(|_| format!("\"method\": {method:?} is not an HTTP method"))?;
        }
        for (name, value) in &self.headers {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("\"headers\": {name:?} is not a valid header name"))?;
            if let Some(why) = unsendable_header(name) {
                return Err(format!("\"headers\": {name:?} cannot be given: {why}"));
            }
            HeaderValue::from_str(value).map_err(|_| {
                format!("\"headers\": the value of {name:?} has characters a header cannot carry")
            })?;
        }
        Ok(())
    }

    /// The method to send, GET by default.
    pub fn method(&self) -> Method {
        self.method
            .as_deref()
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .unwrap_or(Method::GET)
    }

    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<RequestSpec, String> {
        serde_json::from_str(text).map_err(|e| format!("stored request is damaged: {e}"))
    }

    /// With the URL, what makes two imported lines the same job: nothing
    /// for a plain GET, else the sha256 of the whole request.
    pub fn hash(&self) -> String {
        if self.is_plain_get() {
            return String::new();
        }
        format!("{:x}", Sha256::digest(self.to_json().as_bytes()))
    }
}

/// Why a header cannot be given by the user, if it cannot. These describe
/// the connection or the framing of the message, which the HTTP client
/// sets from the URL and the body: given by hand they would contradict it
/// (a wrong Content-Length leaves the server waiting for bytes that never
/// come) or be sent as given to a host they were not meant for.
pub fn unsendable_header(name: &str) -> Option<&'static str> {
    const FRAMING: &str = "jobrun sets it from the body";
    const HOP_BY_HOP: &str =
        "it concerns one connection, which jobrun manages (a hop-by-hop header)";
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "host" => "jobrun sets it from the URL",
        "content-length" | "transfer-encoding" => FRAMING,
        "connection" | "keep-alive" | "te" | "trailer" | "upgrade" | "proxy-connection" => {
            HOP_BY_HOP
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_get_has_no_hash_and_others_hash_the_whole_request() {
        let get = RequestSpec {
            method: Some("GET".into()),
            ..Default::default()
        };
        assert!(get.is_plain_get());
        assert_eq!(get.hash(), "");
        let post = |body: &str| RequestSpec {
            method: Some("POST".into()),
            body: Some(body.into()),
            ..Default::default()
        };
        assert_ne!(post("1").hash(), post("2").hash());
        assert_eq!(post("1").hash(), post("1").hash());
        assert_eq!(post("1").hash().len(), 64);
    }

    #[test]
    fn requests_round_trip_and_are_checked() {
        let mut spec = RequestSpec {
            method: Some("PATCH".into()),
            ..Default::default()
        };
        spec.headers.insert("X-Key".into(), "v".into());
        assert_eq!(RequestSpec::from_json(&spec.to_json()).unwrap(), spec);
        assert!(spec.check().is_ok());
        spec.headers.insert("bad name".into(), "v".into());
        assert!(
            spec.check()
                .unwrap_err()
                .contains("not a valid header name")
        );
        let bad = RequestSpec {
            method: Some("GE T".into()),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("not an HTTP method"));
    }

    #[test]
    fn framing_and_hop_by_hop_headers_are_refused() {
        for name in [
            "Host",
            "content-length",
            "Transfer-Encoding",
            "Connection",
            "Keep-Alive",
            "TE",
            "Trailer",
            "Upgrade",
            "Proxy-Connection",
        ] {
            let mut spec = RequestSpec::default();
            spec.headers.insert(name.into(), "x".into());
            let error = spec.check().unwrap_err();
            assert!(
                error.contains(&format!("{name:?} cannot be given")),
                "{error}"
            );
        }
        assert_eq!(unsendable_header("Accept"), None);
        assert_eq!(unsendable_header("Range"), None);
    }
}
