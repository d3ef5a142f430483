//! Who is calling, and what they may do.
//!
//! Every public RPC carries `authorization: Bearer <JWT>`. The token is
//! verified against the configured keys (a JWKS file for tokens signed by an
//! identity provider, and/or a shared HS256 secret for local use), and its
//! issuer, audience and expiry are checked; anything else is UNAUTHENTICATED
//! with the reason. Health and reflection are not behind it.
//!
//! A verified token makes the caller either a customer — its subject is the
//! customer's user id, and it may act only on its own orders, payments,
//! notifications and profile — or staff, when its `scope` claim holds
//! [`STAFF_SCOPE`]: staff manage the catalog and stock, and act for any
//! customer (read or cancel any order, place one on a customer's behalf,
//! read profiles and purchase histories), as a shop's support staff do.
//! `--auth-disabled` turns all of this off for local demos: every
//! caller is then [`Caller::Anyone`], allowed everything, and the service
//! says so loudly at start-up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ArgAction;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tonic::{Request, Status};
use uuid::Uuid;

use crate::ServiceError;

/// The scope that makes a token's holder staff.
pub const STAFF_SCOPE: &str = "shop.staff";

/// How long a token may be past its expiry and still be accepted (clock
/// skew between the issuer and the services).
const LEEWAY: Duration = Duration::from_secs(30);

/// Authentication settings every service shares.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthSettings {
    /// JSON Web Key Set (a file) with the public keys tokens may be signed
    /// with (RS256, ES256, EdDSA, …), as an identity provider publishes it.
    #[arg(long, env = "AUTH_JWKS_FILE")]
    pub auth_jwks_file: Option<PathBuf>,
    /// Shared secret of HS256 tokens, for local use.
    #[arg(long, env = "AUTH_HS256_SECRET", hide_env_values = true)]
    pub auth_hs256_secret: Option<String>,
    /// The issuer (`iss`) tokens must name.
    #[arg(long, env = "AUTH_ISSUER", default_value = "shop")]
    pub auth_issuer: String,
    /// The audience (`aud`) tokens must name.
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "shop")]
    pub auth_audience: String,
    /// Accept every call without a token, as staff. Only for local demos.
    #[arg(long, env = "AUTH_DISABLED", default_value_t = false, action = ArgAction::Set)]
    pub auth_disabled: bool,
}

impl AuthSettings {
    /// No authentication: for tests and demos of other things.
    pub fn disabled() -> Self {
        Self {
            auth_disabled: true,
            ..Self::default()
        }
    }

    /// HS256 tokens signed with `secret`, issuer and audience `shop`.
    pub fn shared_secret(secret: &str) -> Self {
        Self {
            auth_hs256_secret: Some(secret.to_owned()),
            auth_issuer: "shop".into(),
            auth_audience: "shop".into(),
            ..Self::default()
        }
    }
}

/// Who is calling, as established by [`Authenticator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off: anyone may do anything.
    Anyone,
    /// A customer: the token's subject is the customer's user id.
    Customer(Uuid),
    /// Staff, named by the token's subject.
    Staff(String),
}

impl Caller {
    /// The caller of a request the [`Authenticator`] let through.
    pub fn of<T>(request: &Request<T>) -> Result<Self, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no verified caller"))
    }

    /// Whether the caller may act on `customer`'s behalf (read or change
    /// what belongs to that customer).
    pub fn may_act_for(&self, customer: Uuid) -> bool {
        match self {
            Caller::Anyone | Caller::Staff(_) => true,
            Caller::Customer(id) => *id == customer,
        }
    }

    /// The customer the caller is, if it is one: what it may reach is
    /// limited to that customer's.
    pub fn customer(&self) -> Option<Uuid> {
        match self {
            Caller::Customer(id) => Some(*id),
            Caller::Anyone | Caller::Staff(_) => None,
        }
    }

    /// Whether the caller is staff (or authentication is off).
    pub fn is_staff(&self) -> bool {
        matches!(self, Caller::Anyone | Caller::Staff(_))
    }

    /// PERMISSION_DENIED unless the caller is staff.
    pub fn require_staff(&self) -> Result<(), ServiceError> {
        if self.is_staff() {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "this call needs a token with the {STAFF_SCOPE} scope"
            )))
        }
    }

    /// PERMISSION_DENIED unless the caller may act for `customer`.
    pub fn require_acting_for(&self, customer: Uuid, what: &str) -> Result<(), ServiceError> {
        if self.may_act_for(customer) {
            Ok(())
        } else {
            Err(ServiceError::PermissionDenied(format!(
                "a customer may {what} only for itself"
            )))
        }
    }
}

/// The claims this system reads once a token is verified (issuer,
/// audience, expiry and not-before are checked by the verification).
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    /// Subject: a customer's user id, or a staff member's name.
    pub sub: String,
    /// Scopes: a space-separated string (OAuth 2) or a list.
    #[serde(default)]
    pub scope: Scopes,
}

/// The `scope` claim in either of its common forms.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum Scopes {
    /// `"a b c"`.
    Spaced(String),
    /// `["a", "b", "c"]`.
    Listed(Vec<String>),
    /// No scope.
    #[default]
    None,
}

impl Scopes {
    fn contains(&self, scope: &str) -> bool {
        match self {
            Scopes::Spaced(text) => text.split_whitespace().any(|s| s == scope),
            Scopes::Listed(list) => list.iter().any(|s| s == scope),
            Scopes::None => false,
        }
    }
}

/// The claims of the tokens [`LocalTokens`] issues.
#[derive(Debug, Clone, Serialize)]
struct Issued<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    exp: u64,
    #[serde(skip_serializing_if = "str::is_empty")]
    scope: &'a str,
}

/// Verifies bearer tokens; a tonic interceptor for every public service.
#[derive(Debug, Clone)]
pub struct Authenticator {
    inner: Option<Arc<Keys>>,
}

#[derive(Debug)]
struct Keys {
    secret: Option<DecodingKey>,
    /// The JWKS file's keys, made usable once, with their `kid`s.
    public: Vec<(Option<String>, DecodingKey)>,
    issuer: String,
    audience: String,
}

impl Authenticator {
    /// Builds the authenticator `settings` describe; reads the JWKS file
    /// now, so a bad path or file stops the service at start-up.
    pub fn from_settings(settings: &AuthSettings) -> anyhow::Result<Self> {
        if settings.auth_disabled {
            tracing::warn!(
                "AUTHENTICATION IS OFF (--auth-disabled): every caller may do anything; use this only for local demos"
            );
            return Ok(Self { inner: None });
        }
        let mut public = Vec::new();
        if let Some(path) = &settings.auth_jwks_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("failed to read {}", path.display()))?;
            let jwks: JwkSet = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a JSON Web Key Set", path.display()))?;
            for jwk in &jwks.keys {
                let kid = jwk.common.key_id.clone();
                let key = DecodingKey::from_jwk(jwk)
                    .with_context(|| format!("key {kid:?} of {} is not usable", path.display()))?;
                public.push((kid, key));
            }
        }
        let secret = settings
            .auth_hs256_secret
            .as_deref()
            .filter(|secret| !secret.is_empty());
        anyhow::ensure!(
            secret.is_some() || !public.is_empty(),
            "no keys to verify tokens with: set --auth-jwks-file or --auth-hs256-secret \
             (or --auth-disabled true for a local demo)"
        );
        if let Some(secret) = secret {
            anyhow::ensure!(
                secret.len() >= 32,
                "--auth-hs256-secret must be at least 32 bytes"
            );
        }
        Ok(Self {
            inner: Some(Arc::new(Keys {
                secret: secret.map(|secret| DecodingKey::from_secret(secret.as_bytes())),
                public,
                issuer: settings.auth_issuer.clone(),
                audience: settings.auth_audience.clone(),
            })),
        })
    }

    /// Establishes the caller of a request with `authorization` metadata.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Status> {
        let Some(keys) = &self.inner else {
            return Ok(Caller::Anyone);
        };
        let token = authorization
            .ok_or_else(|| {
                Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
            })?
            .strip_prefix("Bearer ")
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer <token>`"))?
            .trim();
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Status::unauthenticated("the bearer token is not a JWT"))?;
        let key = keys.key_for(&header)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&keys.issuer]);
        validation.set_audience(&[&keys.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY.as_secs();
        let claims = jsonwebtoken::decode::<Claims>(token, key, &validation)
            .map_err(|error| Status::unauthenticated(rejection(error.kind())))?
            .claims;
        if claims.scope.contains(STAFF_SCOPE) {
            return Ok(Caller::Staff(claims.sub));
        }
        Uuid::parse_str(&claims.sub)
            .map(Caller::Customer)
            .map_err(|_| Status::unauthenticated("the token's subject is not a customer id"))
    }
}

impl Keys {
    fn key_for(&self, header: &Header) -> Result<&DecodingKey, Status> {
        match header.alg {
            Algorithm::HS256 => self.secret.as_ref().ok_or_else(|| {
                Status::unauthenticated("HS256 tokens are not accepted by this service")
            }),
            Algorithm::HS384 | Algorithm::HS512 => Err(Status::unauthenticated(
                "only HS256 is accepted among shared-secret algorithms",
            )),
            _ => match &header.kid {
                Some(kid) => self
                    .public
                    .iter()
                    .find(|(id, _)| id.as_deref() == Some(kid.as_str()))
                    .map(|(_, key)| key),
                None if self.public.len() == 1 => self.public.first().map(|(_, key)| key),
                None => None,
            }
            .ok_or_else(|| Status::unauthenticated("the token's signing key is not known")),
        }
    }
}

/// What a client is told when its token is refused.
fn rejection(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::ImmatureSignature => "the token is not valid yet",
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted",
        ErrorKind::InvalidAudience => "the token's audience is not accepted",
        ErrorKind::InvalidSignature => "the token's signature does not verify",
        ErrorKind::MissingRequiredClaim(_) => {
            "the token lacks a required claim (exp, iss, aud, sub)"
        }
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key",
        _ => "the bearer token is not valid",
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let caller = self.authenticate(authorization)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// Issues HS256 tokens with a shared secret: for `shop-local`, its demo and
/// tests. Real deployments get tokens from their identity provider.
#[derive(Clone)]
pub struct LocalTokens {
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl std::fmt::Debug for LocalTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTokens")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl LocalTokens {
    /// Tokens the services configured with `settings`' secret accept.
    pub fn new(settings: &AuthSettings) -> anyhow::Result<Self> {
        let secret = settings
            .auth_hs256_secret
            .as_deref()
            .context("local tokens need --auth-hs256-secret")?;
        Ok(Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            issuer: settings.auth_issuer.clone(),
            audience: settings.auth_audience.clone(),
        })
    }

    /// A token for `subject` with `scope`, valid for `ttl`.
    pub fn token(&self, subject: &str, scope: &str, ttl: Duration) -> String {
        self.token_until(
            subject,
            scope,
            jsonwebtoken::get_current_timestamp() + ttl.as_secs(),
        )
    }

    /// A token for `subject` with `scope` that expires at `exp` (seconds
    /// since the epoch; a past time makes an expired token).
    pub fn token_until(&self, subject: &str, scope: &str, exp: u64) -> String {
        let claims = Issued {
            sub: subject,
            iss: &self.issuer,
            aud: &self.audience,
            exp,
            scope,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .expect("HS256 signing does not fail")
    }

    /// A day-long token of the customer with user id `customer`.
    pub fn customer(&self, customer: Uuid) -> String {
        self.token(&customer.to_string(), "", Duration::from_secs(86_400))
    }

    /// A day-long staff token.
    pub fn staff(&self, name: &str) -> String {
        self.token(name, STAFF_SCOPE, Duration::from_secs(86_400))
    }
}

/// `message` with `authorization: Bearer <token>`, for clients. A token
/// that cannot be metadata (not a JWT) is left out, and the server answers
/// UNAUTHENTICATED.
pub fn signed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {token}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A random secret for a local run, 32 bytes as hex.
pub fn random_secret() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings::shared_secret("0123456789abcdef0123456789abcdef")
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    #[test]
    fn customers_staff_and_bad_tokens_are_told_apart() {
        let auth = Authenticator::from_settings(&settings()).unwrap();
        let tokens = LocalTokens::new(&settings()).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(
            auth.authenticate(Some(&bearer(&tokens.customer(id))))
                .unwrap(),
            Caller::Customer(id)
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&tokens.staff("ops"))))
                .unwrap(),
            Caller::Staff("ops".into())
        );
        let refused =
            |header: Option<&str>| auth.authenticate(header).unwrap_err().message().to_owned();
        assert!(refused(None).contains("missing"));
        assert!(refused(Some("Basic abc")).contains("Bearer"));
        assert!(refused(Some("Bearer abc")).contains("not a JWT"));
        let expired = tokens.token(&id.to_string(), "", Duration::ZERO);
        // Past the leeway only: craft one that expired an hour ago.
        let now = jsonwebtoken::get_current_timestamp();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let sign = |claims: serde_json::Value| {
            bearer(&jsonwebtoken::encode(&Header::default(), &claims, &key).unwrap())
        };
        let claims = |changes: serde_json::Value| {
            let mut claims = serde_json::json!({
                "sub": id.to_string(), "iss": "shop", "aud": "shop", "exp": now + 3600,
            });
            for (name, value) in changes.as_object().unwrap() {
                claims[name] = value.clone();
            }
            claims
        };
        let old = sign(claims(serde_json::json!({ "exp": now - 3600 })));
        assert!(refused(Some(&old)).contains("expired"));
        assert!(
            auth.authenticate(Some(&bearer(&expired))).is_ok(),
            "within the leeway"
        );
        let foreign = sign(claims(serde_json::json!({ "iss": "elsewhere" })));
        assert!(refused(Some(&foreign)).contains("issuer"));
        let early = sign(claims(serde_json::json!({ "nbf": now + 3600 })));
        assert!(refused(Some(&early)).contains("not valid yet"));
        let forged = bearer(
            &jsonwebtoken::encode(
                &Header::default(),
                &claims(serde_json::json!({})),
                &EncodingKey::from_secret(b"another secret of at least 32 bytes!"),
            )
            .unwrap(),
        );
        assert!(refused(Some(&forged)).contains("signature"));
        let odd = sign(claims(serde_json::json!({ "sub": "not-a-uuid" })));
        assert!(refused(Some(&odd)).contains("customer id"));
        // Identity providers send audiences and scopes as lists too.
        let listed = sign(claims(serde_json::json!({
            "aud": ["other", "shop"], "scope": ["read", STAFF_SCOPE], "sub": "ops",
        })));
        assert_eq!(
            auth.authenticate(Some(&listed)).unwrap(),
            Caller::Staff("ops".into())
        );
    }

    #[test]
    fn tokens_signed_by_an_identity_provider_key_in_the_jwks_file_are_accepted() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signing = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("idp-1".into());
        let path = std::env::temp_dir().join(format!("{}-jwks.json", Uuid::new_v4()));
        std::fs::write(
            &path,
            serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap(),
        )
        .unwrap();
        let auth = Authenticator::from_settings(&AuthSettings {
            auth_jwks_file: Some(path.clone()),
            auth_issuer: "shop".into(),
            auth_audience: "shop".into(),
            ..AuthSettings::default()
        })
        .unwrap();
        let _ = std::fs::remove_file(path);

        let id = Uuid::now_v7();
        let claims = serde_json::json!({
            "sub": id.to_string(), "iss": "shop", "aud": "shop",
            "exp": jsonwebtoken::get_current_timestamp() + 600,
        });
        let sign = |kid: &str| {
            let header = Header {
                kid: Some(kid.into()),
                ..Header::new(Algorithm::ES256)
            };
            bearer(&jsonwebtoken::encode(&header, &claims, &signing).unwrap())
        };
        assert_eq!(
            auth.authenticate(Some(&sign("idp-1"))).unwrap(),
            Caller::Customer(id)
        );
        let unknown = auth.authenticate(Some(&sign("idp-2"))).unwrap_err();
        assert!(unknown.message().contains("not known"), "{unknown:?}");
        // Without a configured secret, HS256 tokens are refused outright.
        let hs = LocalTokens::new(&settings()).unwrap().customer(id);
        let refused = auth.authenticate(Some(&bearer(&hs))).unwrap_err();
        assert!(refused.message().contains("HS256"), "{refused:?}");
    }

    #[test]
    fn a_service_without_keys_does_not_start_unless_auth_is_off() {
        assert!(Authenticator::from_settings(&AuthSettings::default()).is_err());
        let short = AuthSettings::shared_secret("short");
        assert!(Authenticator::from_settings(&short).is_err());
        let off = Authenticator::from_settings(&AuthSettings::disabled()).unwrap();
        assert_eq!(off.authenticate(None).unwrap(), Caller::Anyone);
    }
}
