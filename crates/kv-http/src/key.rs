//! Turning a request path into a key.
//!
//! A key is exactly one path segment, percent-decoded, valid UTF-8, and 1 to
//! [`MAX_KEY_BYTES`] bytes long. Paths under `/-/` are reserved for admin
//! endpoints and never reach this module.

use std::borrow::Cow;

use crate::error::ApiError;

/// The longest key accepted, in bytes (after percent-decoding).
pub const MAX_KEY_BYTES: usize = 1024;

/// The key named by `path` (which starts with `/`), decoded.
pub fn parse(path: &str) -> Result<Cow<'_, str>, ApiError> {
    let segment = path.strip_prefix('/').unwrap_or(path);
    if segment.is_empty() {
        return Err(ApiError::InvalidKey("the key is empty; use /<key>"));
    }
    if segment.contains('/') {
        return Err(ApiError::InvalidKey(
            "a key is one path segment (encode '/' as %2F)",
        ));
    }
    let key = percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_err(|_| ApiError::InvalidKey("the key is not valid UTF-8 once percent-decoded"))?;
    if key.is_empty() {
        return Err(ApiError::InvalidKey("the key is empty; use /<key>"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::InvalidKey("the key is longer than 1024 bytes"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_keys_are_borrowed() {
        assert!(matches!(parse("/key_1"), Ok(Cow::Borrowed("key_1"))));
    }

    #[test]
    fn percent_encoded_keys_are_decoded() {
        assert_eq!(parse("/caf%C3%A9").unwrap(), "café");
        assert_eq!(parse("/a%2Fb").unwrap(), "a/b");
        assert_eq!(parse("/a%20b").unwrap(), "a b");
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert!(parse("/").is_err());
        assert!(parse("/a/b").is_err());
        assert!(parse("/%FF").is_err());
        assert!(parse(&format!("/{}", "k".repeat(1025))).is_err());
        assert!(parse(&format!("/{}", "k".repeat(1024))).is_ok());
    }
}
