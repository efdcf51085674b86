//! What may be shown of a URL. A URL can carry a password in its userinfo
//! (`https://user:pass@host/`); everything jobrun prints or logs passes its
//! URLs through `redact_url` first, so the password is shown as `***`. Only
//! the database row (and `export`, which prints the row) keeps it, since the
//! request needs it.

use std::borrow::Cow;

/// What a password is shown as.
pub const HIDDEN: &str = "***";

/// `url` with the password of its userinfo replaced by `***`. A userinfo
/// without a password is hidden whole: a single token before the `@` is
/// usually a secret too (`https://TOKEN@host/`). Works on the text, so a
/// URL that does not parse is still redacted.
pub fn redact_url(url: &str) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://") else {
        return Cow::Borrowed(url);
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#', '\\']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_len].rfind('@') else {
        return Cow::Borrowed(url);
    };
    let userinfo = &rest[..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{HIDDEN}"),
        None => HIDDEN.to_string(),
    };
    Cow::Owned(format!("{}{shown}{}", &url[..start], &rest[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_and_the_rest_is_kept() {
        for (url, shown) in [
            ("https://a.test/x?k=1", "https://a.test/x?k=1"),
            ("https://u:p@a.test/x", "https://u:***@a.test/x"),
            ("http://u:p@a.test:8080", "http://u:***@a.test:8080"),
            ("https://tok3n@a.test/", "https://***@a.test/"),
            ("https://u:p:q@a.test/", "https://u:***@a.test/"),
            ("https://u:p%40x@a.test/", "https://u:***@a.test/"),
            ("https://u:@a.test/", "https://u:***@a.test/"),
            ("https://a.test/x@y", "https://a.test/x@y"),
            ("https://a.test?q=u:p@b", "https://a.test?q=u:p@b"),
            ("https://a.test#u:p@b", "https://a.test#u:p@b"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn an_at_sign_inside_the_password_does_not_leak_its_end() {
        // The url crate escapes `@` in a password, but a raw one must not
        // leave part of the secret behind either: the last `@` ends it.
        assert_eq!(redact_url("http://u:p@ss@a.test/"), "http://u:***@a.test/");
    }
}
