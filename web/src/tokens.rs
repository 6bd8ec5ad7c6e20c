//! Signing and checking JWTs (HS256).

use std::time::Duration;

use chrono::Utc;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{error::ApiError, settings::AuthSettings};

/// Which of the two token kinds a JWT is. A refresh token is never accepted as an
/// access token and the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// Short-lived, sent as `Authorization: Bearer`.
    Access,
    /// Long-lived, exchanged at `/auth/refresh`; revocable (stored by `jti`).
    Refresh,
}

/// The claims of both token kinds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// Token kind.
    pub typ: TokenType,
    /// The user's `token_version` when issued; a token from an older version is refused.
    pub ver: i32,
    /// Unique id (the `refresh_tokens` row for refresh tokens).
    pub jti: Uuid,
    /// Issued at (seconds since the epoch).
    pub iat: i64,
    /// Expires at (seconds since the epoch).
    pub exp: i64,
}

/// Keys and lifetimes.
#[derive(Clone)]
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Lifetime of access tokens.
    pub access_ttl: Duration,
    /// Lifetime of refresh tokens.
    pub refresh_ttl: Duration,
}

impl Jwt {
    /// Keys from the settings.
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.jwt_secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            access_ttl: settings.access_ttl,
            refresh_ttl: settings.refresh_ttl,
        }
    }

    /// Signs a token of `typ` for `user_id`.
    pub fn issue(&self, typ: TokenType, user_id: Uuid, ver: i32, jti: Uuid) -> String {
        let ttl = match typ {
            TokenType::Access => self.access_ttl,
            TokenType::Refresh => self.refresh_ttl,
        };
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user_id,
            typ,
            ver,
            jti,
            iat: now,
            exp: now + ttl.as_secs() as i64,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing of plain claims cannot fail")
    }

    /// Checks signature, expiry and kind.
    pub fn verify(&self, token: &str, typ: TokenType) -> Result<Claims, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let claims = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => ApiError::unauthorized("token expired"),
                _ => ApiError::unauthorized("invalid token"),
            })?
            .claims;
        if claims.typ != typ {
            return Err(ApiError::unauthorized("wrong kind of token"));
        }
        Ok(claims)
    }
}
