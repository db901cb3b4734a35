//! How a caller proves who it is: the run's token on every call, and after `Register` the
//! worker's key. Both travel in gRPC metadata, never in message bodies, so the coordinator can
//! refuse a call before it reads the body (docs/security.md).

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// Metadata carrying `Bearer <token>` when the run has a token.
pub const TOKEN_HEADER: &str = "authorization";
/// Metadata carrying the worker's key (32 lowercase hex digits) on every call after `Register`.
pub const WORKER_KEY_HEADER: &str = "x-vae-worker-key";

/// A worker's credential: 128 random bits the coordinator hands out at registration. Knowing a
/// worker's number (in logs) gives nothing; only the key names a worker on a call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WorkerKey([u8; 16]);

impl WorkerKey {
    /// A fresh key from the operating system's generator (via `rand`'s thread-local CSPRNG).
    pub fn random() -> Self {
        use rand::RngExt;
        WorkerKey(rand::rng().random())
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(WorkerKey)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Compares in time independent of where the keys differ.
    pub fn matches(&self, other: &WorkerKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The key a call presents in its metadata: `None` when absent or malformed.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        let text = metadata.get(WORKER_KEY_HEADER)?.to_str().ok()?;
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(text, &mut bytes).ok()?;
        Some(WorkerKey(bytes))
    }

    fn to_metadata(self) -> AsciiMetadataValue {
        hex::encode(self.0)
            .parse()
            .expect("hex digits are valid metadata")
    }
}

/// Never prints the key itself: logs and debug output must not leak credentials.
impl fmt::Debug for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkerKey(..)")
    }
}

/// The run's shared secret, held as a digest so that comparisons take the same time whatever
/// the presented value (its length included).
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
    header: AsciiMetadataValue,
}

impl Token {
    /// Checks that `secret` can travel as metadata: visible ASCII, no spaces, not empty.
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("the token is empty".into());
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)"
                    .into(),
            );
        }
        Ok(Token {
            digest: Sha256::digest(secret.as_bytes()).into(),
            header: format!("Bearer {secret}")
                .parse()
                .expect("visible ASCII is valid metadata"),
        })
    }

    /// Whether `metadata` carries this token.
    pub fn presented_in(&self, metadata: &MetadataMap) -> bool {
        let presented = metadata
            .get(TOKEN_HEADER)
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .unwrap_or_default();
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// The token in `path`: its contents without surrounding whitespace. Files, unlike flags, stay
/// out of `ps` and shell history.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    const MAX_TOKEN_FILE_BYTES: u64 = 4096;
    let what = |e: String| format!("token file {}: {e}", path.display());
    let size = std::fs::metadata(path)
        .map_err(|e| what(e.to_string()))?
        .len();
    if size > MAX_TOKEN_FILE_BYTES {
        return Err(what(format!(
            "{size} bytes is too long for a token (at most {MAX_TOKEN_FILE_BYTES})"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(what("the file is empty".into()));
    }
    Ok(token.to_string())
}

/// A client interceptor that adds the token and, once registered, the worker's key to every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<Token>,
    key: Option<WorkerKey>,
}

impl Credentials {
    pub fn new(token: Option<Token>) -> Self {
        Credentials { token, key: None }
    }

    /// The same credentials, plus the key `Register` returned.
    pub fn with_key(&self, key: WorkerKey) -> Self {
        Credentials {
            token: self.token.clone(),
            key: Some(key),
        }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let metadata = request.metadata_mut();
        if let Some(token) = &self.token {
            metadata.insert(TOKEN_HEADER, token.header.clone());
        }
        if let Some(key) = self.key {
            metadata.insert(WORKER_KEY_HEADER, key.to_metadata());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn sent(credentials: &mut Credentials) -> MetadataMap {
        credentials
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .clone()
    }

    #[test]
    fn the_interceptor_sends_what_the_coordinator_checks() {
        let token = Token::new("s3cret").unwrap();
        let key = WorkerKey::random();
        let mut credentials = Credentials::new(Some(token.clone())).with_key(key);
        let metadata = sent(&mut credentials);
        assert!(token.presented_in(&metadata));
        assert!(!Token::new("s3cre").unwrap().presented_in(&metadata));
        assert!(!Token::new("s3cret2").unwrap().presented_in(&metadata));
        let presented = WorkerKey::from_metadata(&metadata).unwrap();
        assert!(presented.matches(&key));
        assert!(!presented.matches(&WorkerKey::random()));

        let bare = sent(&mut Credentials::new(None));
        assert!(!token.presented_in(&bare));
        assert!(WorkerKey::from_metadata(&bare).is_none());
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "abc123");
        std::fs::write(&path, " \n").unwrap();
        assert!(read_token_file(&path).unwrap_err().contains("empty"));
        std::fs::write(&path, "x".repeat(5000)).unwrap();
        assert!(read_token_file(&path).unwrap_err().contains("too long"));
        let missing = read_token_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[test]
    fn malformed_tokens_and_keys_are_refused() {
        assert!(Token::new("").is_err());
        assert!(Token::new("two words").is_err());
        assert!(Token::new("caf\u{e9}").is_err());
        let mut metadata = MetadataMap::new();
        metadata.insert(WORKER_KEY_HEADER, "abc".parse().unwrap());
        assert!(WorkerKey::from_metadata(&metadata).is_none());
        assert!(WorkerKey::from_bytes(&[0; 15]).is_none());
        assert_eq!(format!("{:?}", WorkerKey::random()), "WorkerKey(..)");
        assert_eq!(format!("{:?}", Token::new("x").unwrap()), "Token(..)");
    }
}
