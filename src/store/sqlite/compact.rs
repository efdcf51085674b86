//! How a row is kept small, since a job may hold millions. A URL is split
//! into its origin's prefix (`scheme://host[:port]`, kept once in the
//! `origins` table) and the rest, kept in the row; a file name that starts
//! with a lowercase UUID, as generated names do, is kept as the UUID's 16
//! bytes followed by the rest of the name instead of 36 characters.
//!
//! Both forms map one to one onto what they stand for, so the unique
//! indexes on them still say when two URLs or two names are the same;
//! migration `07-compact` converts older rows by the same rules.

use rusqlite::ToSql;
use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use uuid::Uuid;

/// The full URL of a row of `urls`, in SQL.
pub(super) const FULL_URL: &str =
    "(SELECT prefix FROM origins WHERE origins.id = urls.origin_id) || urls.url";

/// The host of a row of `urls`, in SQL.
pub(super) const HOST: &str = "(SELECT host FROM origins WHERE origins.id = urls.origin_id)";

/// `url` as (prefix, rest): the prefix is everything before the path, or
/// nothing when that part holds a user name or password (a password is
/// kept nowhere but in its own row's URL) or when there is no path.
pub(super) fn split_url(url: &str) -> (&str, &str) {
    if let Some(scheme_end) = find_scheme_end(url) {
        let rest = &url[scheme_end + 3..];
        if let Some(slash) = rest.find('/')
            && !rest[..slash].contains(['@', '?', '#'])
        {
            return url.split_at(scheme_end + 3 + slash);
        }
    }
    ("", url)
}

/// Where the first `://` in `url` is. The same as `url.find("://")`, which
/// sets up a substring search for every call: a tenth of the instructions
/// of an import's writing thread went to it, once per URL.
fn find_scheme_end(url: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(at) = url[from..].find(':') {
        let colon = from + at;
        if url[colon + 1..].starts_with("//") {
            return Some(colon);
        }
        from = colon + 1;
    }
    None
}

/// Characters in a hyphenated UUID.
const UUID_TEXT: usize = 36;

/// Bytes of a name kept as a UUID that fit without an allocation: the
/// UUID's 16 and an extension of up to 16.
const INLINE: usize = 32;

/// A file name as the `path` column keeps it.
pub(super) enum StoredPath<'a> {
    Text(&'a str),
    /// The name's first 36 characters as a UUID, then the rest: in place
    /// when short (`len` bytes of `bytes`), else on the heap.
    Uuid {
        bytes: [u8; INLINE],
        len: u8,
    },
    LongUuid(Vec<u8>),
}

impl StoredPath<'_> {
    pub(super) fn of(path: &str) -> StoredPath<'_> {
        let Some(head) = path.get(..UUID_TEXT) else {
            return StoredPath::Text(path);
        };
        let mut text = [0u8; UUID_TEXT];
        match Uuid::try_parse(head) {
            // Only the form that reads back the same: lowercase, hyphenated.
            Ok(uuid) if uuid.hyphenated().encode_lower(&mut text) == head => {
                let rest = &path.as_bytes()[UUID_TEXT..];
                let len = 16 + rest.len();
                if len <= INLINE {
                    let mut bytes = [0u8; INLINE];
                    bytes[..16].copy_from_slice(uuid.as_bytes());
                    bytes[16..len].copy_from_slice(rest);
                    StoredPath::Uuid {
                        bytes,
                        len: len as u8,
                    }
                } else {
                    let mut bytes = uuid.as_bytes().to_vec();
                    bytes.extend_from_slice(rest);
                    StoredPath::LongUuid(bytes)
                }
            }
            _ => StoredPath::Text(path),
        }
    }
}

impl ToSql for StoredPath<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            StoredPath::Text(text) => ToSqlOutput::Borrowed(ValueRef::Text(text.as_bytes())),
            StoredPath::Uuid { bytes, len } => {
                ToSqlOutput::Borrowed(ValueRef::Blob(&bytes[..usize::from(*len)]))
            }
            StoredPath::LongUuid(bytes) => ToSqlOutput::Borrowed(ValueRef::Blob(bytes)),
        })
    }
}

/// A file name read from the `path` column.
pub(super) struct PathColumn(pub String);

impl FromSql for PathColumn {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Text(_) => String::column_result(value).map(PathColumn),
            ValueRef::Blob(bytes) if bytes.len() >= 16 => {
                let uuid =
                    Uuid::from_slice(&bytes[..16]).map_err(|e| FromSqlError::Other(Box::new(e)))?;
                let rest = std::str::from_utf8(&bytes[16..])
                    .map_err(|e| FromSqlError::Other(Box::new(e)))?;
                Ok(PathColumn(format!("{}{rest}", uuid.hyphenated())))
            }
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_splits_before_its_path_unless_it_holds_a_password() {
        assert_eq!(
            split_url("http://a.example:8080/x/y?z"),
            ("http://a.example:8080", "/x/y?z")
        );
        assert_eq!(split_url("https://[::1]/"), ("https://[::1]", "/"));
        assert_eq!(
            split_url("http://u:p@a.example/x"),
            ("", "http://u:p@a.example/x")
        );
        assert_eq!(
            split_url("http://a.example?q=/x"),
            ("", "http://a.example?q=/x")
        );
        assert_eq!(split_url("http://a.example"), ("", "http://a.example"));
        assert_eq!(split_url("no scheme/x"), ("", "no scheme/x"));
        assert_eq!(split_url("a:b://c.test/x"), ("a:b://c.test", "/x"));
        assert_eq!(split_url("a:/b:"), ("", "a:/b:"));
    }

    fn round_trip(path: &str) -> (bool, String) {
        let stored = StoredPath::of(path);
        let output = stored.to_sql().unwrap();
        let value = match &output {
            ToSqlOutput::Borrowed(value) => *value,
            _ => unreachable!(),
        };
        let blob = matches!(value, ValueRef::Blob(_));
        (blob, PathColumn::column_result(value).unwrap().0)
    }

    #[test]
    fn a_name_starting_with_a_lowercase_uuid_is_kept_in_16_bytes_and_reads_back() {
        let uuid = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        for name in [
            uuid.to_string(),
            format!("{uuid}.json"),
            format!("{uuid}/é.txt"),
            format!("{uuid}.0123456789abcde"),
            format!("{uuid}.0123456789abcdef"),
            format!("{uuid}/a-much-longer-name-after-it.json"),
        ] {
            assert_eq!(round_trip(&name), (true, name.clone()));
        }
        for name in [
            "0190A1B2-C3D4-7E5F-8A9B-0C1D2E3F4A5B.json",
            "0190a1b2c3d47e5f8a9b0c1d2e3f4a5b.json",
            "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5",
            "reports/a.json",
            "",
        ] {
            assert_eq!(round_trip(name), (false, name.to_string()));
        }
    }
}
