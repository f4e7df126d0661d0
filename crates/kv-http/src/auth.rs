//! Bearer-token authentication and protected mode (issue 14), for kv-node
//! and kv-proxy alike: one check, in one place.
//!
//! * **The token** comes from `--auth-token-file PATH` (one line; its
//!   trailing newline is trimmed) or the `KV_AUTH_TOKEN` environment
//!   variable. An unreadable, empty or multi-line file, a token with
//!   characters a header cannot carry, or both sources at once, refuse the
//!   start with a message saying which ([`AuthError`]).
//! * **Every request** except `GET`/`HEAD /-/health` (what load balancers and
//!   Docker's `HEALTHCHECK` probe, with no way to add a header) must carry
//!   `Authorization: Bearer <token>`; anything else is a 401 JSON answer with
//!   `WWW-Authenticate: Bearer realm="kv"` ([`ApiError::Unauthorized`],
//!   mapped in the one status map). The scheme is matched without regard to
//!   case (RFC 9110 §11.1). `/-/metrics` is behind it too unless
//!   `--metrics-open` (a Prometheus scraper without credentials); every
//!   other admin path and node-to-node traffic always are.
//! * **The comparison** runs in constant time in the presented token's
//!   contents and length ([`constant_time_eq`], on the `subtle` crate), so a
//!   client cannot learn the token byte by byte from response times.
//! * **Protected mode**, as Redis has it: a server asked to listen on an
//!   address other than loopback without a token refuses to start (exit
//!   code 2) and says how to set one, or to pass `--insecure-no-auth`.
//!   Loopback needs no token, and stays the default.
//!
//! A header too large for hyper's buffer never reaches this code: hyper
//! refuses the head first, and [`crate::canned`] makes that the JSON 431.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use hyper::Method;
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// The environment variable that holds the token itself.
pub const TOKEN_ENV: &str = "KV_AUTH_TOKEN";
/// The exit code of a start refused for its configuration (as clap's).
pub const CONFIG_EXIT_CODE: u8 = 2;
/// Distinct peers whose refusal is remembered (to log each once); past it,
/// refusals are logged at debug only, so forged peer names cannot grow
/// memory without bound.
const MAX_REMEMBERED_PEERS: usize = 1024;

/// A shared secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Box<[u8]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<{} bytes>)", self.0.len())
    }
}

impl Token {
    /// A token from its text: non-empty, visible ASCII without spaces (what
    /// a header value carries unchanged; `openssl rand -hex 32` fits).
    pub fn new(text: &str, source: &str) -> Result<Token, AuthError> {
        if text.is_empty() {
            return Err(AuthError::Empty {
                origin: source.to_owned(),
            });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::BadCharacters {
                origin: source.to_owned(),
            });
        }
        Ok(Token(text.as_bytes().into()))
    }

    /// The token in `path`: one line, its trailing newline trimmed.
    pub fn from_file(path: &Path) -> Result<Token, AuthError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
            path: path.to_path_buf(),
            error: error.to_string(),
        })?;
        let line = text
            .strip_suffix('\n')
            .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
        if line.contains('\n') {
            return Err(AuthError::MultiLine { origin: source });
        }
        Token::new(line, &source)
    }

    /// Whether `presented` is this token, in time independent of
    /// `presented`'s contents and length.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }

    /// `Bearer <token>`, marked sensitive (hyper never logs it, and HPACK
    /// would never index it), for the requests this process sends.
    pub fn authorization(&self) -> HeaderValue {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(&self.0);
        // Visible ASCII only (checked in `new`), so this cannot fail; an
        // empty value would then be refused by the peer, not panic here.
        let mut value =
            HeaderValue::from_bytes(&value).unwrap_or_else(|_| HeaderValue::from_static(""));
        value.set_sensitive(true);
        value
    }
}

/// Whether `presented` equals `expected`, in time that depends on
/// `expected`'s length only: every byte of `expected` is compared (against
/// a zero past `presented`'s end), and the lengths are compared too, all
/// without branching on a secret byte. `subtle`'s slice comparison returns
/// early on a length mismatch, which would tell an attacker the length.
pub fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut equal = (expected.len() as u64).ct_eq(&(presented.len() as u64));
    for (i, byte) in expected.iter().enumerate() {
        let theirs = presented.get(i).copied().unwrap_or(0);
        equal &= byte.ct_eq(&theirs);
    }
    equal.into()
}

/// The credentials of an `Authorization` value, when its scheme is
/// `Bearer` (any case, RFC 9110 §11.1) followed by one or more spaces.
/// `Err` names what is wrong, for the 401's message.
pub fn bearer_token(value: &HeaderValue) -> Result<&[u8], &'static str> {
    let bytes = value.as_bytes();
    let (scheme, rest) = bytes
        .iter()
        .position(|&b| b == b' ')
        .and_then(|space| bytes.split_at_checked(space))
        .unwrap_or((bytes, &b""[..]));
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err("the Authorization scheme must be Bearer");
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err("the Bearer token is missing");
    }
    Ok(token)
}

/// The flags, shared by kv-node and kv-proxy (flattened into theirs).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// Require `Authorization: Bearer <token>` on every request but
    /// `GET /-/health`, with the token in this file (one line; a trailing
    /// newline is trimmed). The environment variable KV_AUTH_TOKEN may hold
    /// the token itself instead. Needed to listen on an address other than
    /// loopback (protected mode).
    #[arg(long, env = "KV_AUTH_TOKEN_FILE", value_name = "PATH")]
    pub auth_token_file: Option<PathBuf>,

    /// Serve `GET /-/metrics` without a token (for a Prometheus scraper
    /// that has none); every other path still needs one.
    #[arg(long, env = "KV_METRICS_OPEN")]
    pub metrics_open: bool,

    /// Listen on an address other than loopback without a token: anyone who
    /// can reach the port can then read, overwrite and delete every key.
    #[arg(long, env = "KV_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
}

impl AuthArgs {
    /// The token, from `--auth-token-file` or `KV_AUTH_TOKEN`, if any.
    pub fn token(&self) -> Result<Option<Token>, AuthError> {
        let from_env = std::env::var_os(TOKEN_ENV);
        match (&self.auth_token_file, from_env) {
            (Some(_), Some(_)) => Err(AuthError::TwoSources),
            (Some(path), None) => Token::from_file(path).map(Some),
            (None, Some(value)) => match value.to_str() {
                Some(text) => Token::new(text, TOKEN_ENV).map(Some),
                None => Err(AuthError::BadCharacters {
                    origin: TOKEN_ENV.to_owned(),
                }),
            },
            (None, None) => Ok(None),
        }
    }

    /// What a server listening on `bind` checks: the token, or none on
    /// loopback (or with `--insecure-no-auth`); protected mode refuses the
    /// rest.
    pub fn resolve(&self, bind: IpAddr, program: &str) -> Result<Auth, AuthError> {
        let auth = self.validate(bind, program)?;
        if auth.token.is_none() && self.insecure_no_auth {
            log::warn!(
                "--insecure-no-auth: listening on {bind} without a token; anyone who can reach \
                 the port can read, overwrite and delete every key"
            );
        }
        Ok(auth)
    }

    /// [`resolve`](Self::resolve) without its warning: for a binary's
    /// check before it binds (it resolves again when it serves).
    pub fn validate(&self, bind: IpAddr, program: &str) -> Result<Auth, AuthError> {
        let token = self.token()?;
        if token.is_some() && self.insecure_no_auth {
            return Err(AuthError::TokenAndInsecure);
        }
        if token.is_none() && !self.insecure_no_auth && !bind.to_canonical().is_loopback() {
            return Err(AuthError::Unprotected {
                bind,
                program: program.to_owned(),
            });
        }
        Ok(Auth::new(token, self.metrics_open))
    }
}

/// Why the authentication settings refuse the start.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the auth token file {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("the auth token in {origin} is empty")]
    Empty { origin: String },
    #[error("the auth token file {origin} has more than one line; it must hold the token alone")]
    MultiLine { origin: String },
    #[error(
        "the auth token in {origin} has a character other than visible ASCII (no spaces); \
         generate one with e.g. `openssl rand -hex 32`"
    )]
    BadCharacters { origin: String },
    #[error("both --auth-token-file and KV_AUTH_TOKEN are set: give the token one way")]
    TwoSources,
    #[error("--insecure-no-auth contradicts the auth token that is set: drop one")]
    TokenAndInsecure,
    #[error(
        "protected mode: refusing to listen on {bind} without an auth token: anyone who can \
         reach it could read, overwrite and delete every key. Set a token with \
         --auth-token-file PATH (or the KV_AUTH_TOKEN environment variable), e.g. \
         `openssl rand -hex 32 > token && {program} --auth-token-file token ...`, and send \
         `Authorization: Bearer <token>`; or listen on loopback (the default, 127.0.0.1); or \
         pass --insecure-no-auth to serve it unprotected"
    )]
    Unprotected { bind: IpAddr, program: String },
}

/// What a server checks on every request (see the module docs).
#[derive(Debug, Default)]
pub struct Auth {
    token: Option<Token>,
    metrics_open: bool,
    /// Peers whose refusal was logged already.
    refused_peers: Mutex<HashSet<String>>,
}

impl Auth {
    pub fn new(token: Option<Token>, metrics_open: bool) -> Self {
        Self {
            token,
            metrics_open,
            refused_peers: Mutex::new(HashSet::new()),
        }
    }

    /// No token: every request passes.
    pub fn open() -> Self {
        Self::default()
    }

    /// The token requests must carry, if any (also what this process sends
    /// to its peers).
    pub fn token(&self) -> Option<&Token> {
        self.token.as_ref()
    }

    /// Admits a request, or says why not (401). `peer` names the sender
    /// when it says it is a node of the cluster (its refusal is logged
    /// once per peer, at warn: a misconfigured member is an operator's
    /// problem; a client's is logged at debug only).
    #[inline]
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        peer: impl FnOnce() -> Option<String>,
    ) -> Result<(), ApiError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        if exempt(method, path, self.metrics_open) {
            return Ok(());
        }
        let verdict = match authorization(headers) {
            Ok(presented) if token.matches(presented) => return Ok(()),
            Ok(_) => "the token is not valid",
            Err(why) => why,
        };
        self.log_refusal(peer(), path, verdict);
        Err(ApiError::Unauthorized(verdict))
    }

    fn log_refusal(&self, peer: Option<String>, path: &str, verdict: &str) {
        let Some(peer) = peer else {
            log::debug!("401 for {path}: {verdict}");
            return;
        };
        let first = {
            let mut seen = self
                .refused_peers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            seen.len() < MAX_REMEMBERED_PEERS && seen.insert(peer.clone())
        };
        if first {
            log::warn!(
                "refused {peer}'s requests ({path}): {verdict}; it must be started with this \
                 cluster's auth token (logged once per peer)"
            );
        } else {
            log::debug!("401 for {peer} ({path}): {verdict}");
        }
    }
}

/// What needs no token: the liveness probe, and metrics when opened.
fn exempt(method: &Method, path: &str, metrics_open: bool) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
        && (path == "/-/health" || (metrics_open && path == "/-/metrics"))
}

/// The presented token: exactly one `Authorization` header, scheme Bearer.
fn authorization(headers: &HeaderMap) -> Result<&[u8], &'static str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err("an 'Authorization: Bearer <token>' header is required");
    };
    if values.next().is_some() {
        return Err("more than one Authorization header");
    }
    bearer_token(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hyper::StatusCode;

    fn headers(value: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(AUTHORIZATION, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn constant_time_eq_is_plain_equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret", b""));
        // A shorter presented token padded with zeros is still not equal.
        assert!(!constant_time_eq(b"ab\0", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_needs_a_token() {
        let parse =
            |v: &'static str| bearer_token(&HeaderValue::from_static(v)).map(<[u8]>::to_vec);
        assert_eq!(parse("Bearer abc").unwrap(), b"abc");
        assert_eq!(parse("bearer abc").unwrap(), b"abc");
        assert_eq!(parse("BEARER   abc  ").unwrap(), b"abc");
        assert!(parse("Basic YWxhZGRpbjpvcGVuc2VzYW1l").is_err());
        assert!(parse("Bearer").is_err());
        assert!(parse("Bearer ").is_err());
        assert!(parse("Bearerabc").is_err());
        assert!(parse("abc").is_err());
    }

    #[test]
    fn only_the_right_token_passes_and_health_is_open() {
        let auth = Auth::new(Some(Token::new("s3cret", "test").unwrap()), false);
        let check = |method: &Method, path: &str, h: &HeaderMap| {
            auth.check(method, path, h, || Some("node 2".into()))
        };
        assert!(check(&Method::GET, "/k", &headers(Some("Bearer s3cret"))).is_ok());
        assert!(check(&Method::PUT, "/k", &headers(Some("bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            let error = check(&Method::GET, "/k", &headers(bad)).unwrap_err();
            assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
            let response = error.into_response();
            assert_eq!(
                response.headers()[hyper::header::WWW_AUTHENTICATE],
                "Bearer realm=\"kv\""
            );
        }
        let mut two = headers(Some("Bearer s3cret"));
        two.append(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(check(&Method::GET, "/k", &two).is_err());
        assert!(check(&Method::GET, "/-/health", &headers(None)).is_ok());
        assert!(check(&Method::HEAD, "/-/health", &headers(None)).is_ok());
        assert!(check(&Method::POST, "/-/health", &headers(None)).is_err());
        assert!(check(&Method::GET, "/-/metrics", &headers(None)).is_err());
        assert!(check(&Method::GET, "/-/ready", &headers(None)).is_err());
        assert!(check(&Method::POST, "/-/raft/append", &headers(None)).is_err());
        let open_metrics = Auth::new(Some(Token::new("s3cret", "test").unwrap()), true);
        assert!(open_metrics
            .check(&Method::GET, "/-/metrics", &headers(None), || None)
            .is_ok());
        assert!(open_metrics
            .check(&Method::GET, "/-/shards", &headers(None), || None)
            .is_err());
        // No token: everything passes.
        assert!(Auth::open()
            .check(&Method::GET, "/k", &headers(None), || None)
            .is_ok());
    }

    #[test]
    fn token_files_are_one_line_and_not_empty() {
        let dir = std::env::temp_dir().join(format!("kv-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let token = Token::from_file(&write("ok", "abc123\n")).unwrap();
        assert!(token.matches(b"abc123"));
        assert!(Token::from_file(&write("crlf", "abc123\r\n"))
            .unwrap()
            .matches(b"abc123"));
        assert!(matches!(
            Token::from_file(&write("empty", "\n")),
            Err(AuthError::Empty { .. })
        ));
        assert!(matches!(
            Token::from_file(&write("two", "a\nb\n")),
            Err(AuthError::MultiLine { .. })
        ));
        assert!(matches!(
            Token::from_file(&write("space", "a b\n")),
            Err(AuthError::BadCharacters { .. })
        ));
        assert!(matches!(
            Token::from_file(&dir.join("missing")),
            Err(AuthError::Read { .. })
        ));
        assert_eq!(format!("{token:?}"), "Token(<6 bytes>)");
        assert_eq!(token.authorization(), "Bearer abc123");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn protected_mode_refuses_other_addresses_without_a_token() {
        if std::env::var_os(TOKEN_ENV).is_some() {
            // A token in this environment would be the token: nothing to test.
            return;
        }
        let refused = |args: &AuthArgs, ip: &str| {
            matches!(
                args.validate(ip.parse().unwrap(), "kv-node"),
                Err(AuthError::Unprotected { .. })
            )
        };
        let none = AuthArgs::default();
        for loopback in ["127.0.0.1", "127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(!refused(&none, loopback), "{loopback}");
        }
        for other in ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "fe80::1"] {
            assert!(refused(&none, other), "{other}");
        }
        let insecure = AuthArgs {
            insecure_no_auth: true,
            ..AuthArgs::default()
        };
        assert!(!refused(&insecure, "0.0.0.0"));
        let message = none
            .validate("0.0.0.0".parse().unwrap(), "kv-node")
            .unwrap_err()
            .to_string();
        for hint in ["--auth-token-file", "KV_AUTH_TOKEN", "--insecure-no-auth"] {
            assert!(message.contains(hint), "{message}");
        }
    }
}
