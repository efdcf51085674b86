//! Reading a URL list: one URL per line, streamed, so memory does not grow
//! with the file. Each line is either skipped (blank, `#` comment), a URL,
//! or rejected with a reason the user can act on.

use std::io::{self, BufRead};

use reqwest::Url;

/// Lines longer than this are rejected rather than read into memory.
pub const MAX_LINE: usize = 64 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Skip,
    Url(Url),
    Reject(String),
}

/// Reads the next line into `buf` (without its end), reading at most
/// `MAX_LINE` bytes of it. Returns None at the end of the input, and
/// Some(false) for a line that was too long (the rest of it is skipped).
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
    loop {
        let (skip, found) = {
            let available = reader.fill_buf()?;
            match available.iter().position(|&b| b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), available.is_empty()),
            }
        };
        reader.consume(skip);
        if found {
            return Ok(Some(false));
        }
    }
}

/// Classifies one line (without its line end). `first` strips a UTF-8 BOM.
pub fn parse_line(raw: &[u8], first: bool) -> Line {
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
    let url = match Url::parse(text) {
        Ok(url) => url,
        Err(e) => return Line::Reject(format!("not a URL: {e}")),
    };
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Line::Reject(format!(
                "unsupported scheme \"{other}\" (only http and https URLs are fetched)"
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Line::Reject("the URL has no host".into());
    }
    Line::Url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Line {
        Line::Url(Url::parse(text).unwrap())
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
                match parse_line(&raw, first) {
                    Line::Url(url) => {
                        prop_assert!(matches!(url.scheme(), "http" | "https"));
                        prop_assert!(url.host_str().is_some_and(|h| !h.is_empty()));
                    }
                    Line::Reject(reason) => prop_assert!(!reason.is_empty()),
                    Line::Skip => {}
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
