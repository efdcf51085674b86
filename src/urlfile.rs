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
}
