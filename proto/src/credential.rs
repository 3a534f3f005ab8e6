//! How a proxy proves who it is to the controller (CA and config stream):
//! a bearer token. In local mode it is the node token the controller made;
//! in Kubernetes a projected ServiceAccount token (audience `weft-ca`) that
//! the kubelet rewrites before it expires — so a token file is read again
//! at each use, never once at start.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};

#[derive(Debug, Clone)]
pub enum Credential {
    /// Read at each use.
    File(PathBuf),
    /// Fixed (tests, and callers that already hold the token).
    Token(Arc<str>),
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read token file {path}: {reason}; check the --token-file mount")]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("token {0} is empty or has characters not allowed in a header")]
    Malformed(String),
}

impl From<&str> for Credential {
    fn from(token: &str) -> Self {
        Credential::Token(token.trim().into())
    }
}

impl From<PathBuf> for Credential {
    fn from(path: PathBuf) -> Self {
        Credential::File(path)
    }
}

impl Credential {
    /// The token as it is now.
    pub fn token(&self) -> Result<String, CredentialError> {
        match self {
            Credential::Token(t) => Ok(t.to_string()),
            Credential::File(path) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_owned())
                .map_err(|reason| CredentialError::Read {
                    path: path.clone(),
                    reason,
                }),
        }
    }

    /// The `authorization` header value: `Bearer <token>`.
    pub fn bearer(&self) -> Result<MetadataValue<Ascii>, CredentialError> {
        let token = self.token()?;
        let what = || match self {
            Credential::File(p) => format!("in {}", p.display()),
            Credential::Token(_) => "given".to_owned(),
        };
        if token.is_empty() {
            return Err(CredentialError::Malformed(what()));
        }
        format!("Bearer {token}")
            .parse()
            .map_err(|_| CredentialError::Malformed(what()))
    }
}

/// Why a proxy cannot reach the controller with what it was given.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Roots(#[from] crate::roots::RootsError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

/// What a proxy (ztunnel, waypoint) needs to talk to the controller,
/// checked at start: the mesh roots in `ca_root`, followed (a rotated root
/// is trusted without a restart), and the token in `token_file`, read now
/// so a missing mount fails the start and then again at each use.
/// Must be called inside a tokio runtime (the roots' follower runs there).
pub fn controller_access(
    ca_root: &std::path::Path,
    token_file: &std::path::Path,
) -> Result<(crate::roots::Roots, Credential), AccessError> {
    let roots = crate::roots::Roots::follow(ca_root, crate::roots::POLL)?;
    let credential = Credential::File(token_file.to_owned());
    credential.bearer()?;
    Ok((roots, credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kubelet replaces a projected token in place: the next use sees
    /// the new one.
    #[test]
    fn a_token_file_is_read_at_each_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").expect("write");
        let c = Credential::from(path.clone());
        assert_eq!(c.bearer().expect("bearer"), "Bearer first");
        std::fs::write(&path, "second").expect("write");
        assert_eq!(c.bearer().expect("bearer"), "Bearer second");
        std::fs::write(&path, "bad\ntoken").expect("write");
        assert!(matches!(c.bearer(), Err(CredentialError::Malformed(_))));
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(c.bearer(), Err(CredentialError::Read { .. })));
    }
}
