//! `kiln token create|list|rotate|revoke` through the admin API of a
//! running server. (Bootstrapping the first admin token directly on a
//! token file is the server binary's business: it owns the file format.)

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use kiln_proto::kiln::admin::tokens_client::TokensClient;
use kiln_proto::kiln::admin::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, RevokeTokenRequest, RotateTokenRequest,
    TokenInfo,
};

use crate::client::Connection;

/// Parses `365d`, `12h`, `30m`, `45s`, or `never`/`0` into seconds (0: never).
pub fn parse_duration(text: &str) -> Result<i64> {
    if text == "never" || text == "0" {
        return Ok(0);
    }
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 =
        number.parse().with_context(|| format!("duration {text:?}: expected e.g. 365d, 12h, 30m"))?;
    let scale = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" | "" => 1,
        _ => bail!("duration {text:?}: unit must be d, h, m or s"),
    };
    n.checked_mul(scale).filter(|s| *s > 0).with_context(|| format!("duration {text:?} is out of range"))
}

pub async fn create(
    c: &Connection,
    principal: &str,
    tenant: &str,
    permissions: &[String],
    ttl_seconds: i64,
) -> Result<CreateTokenResponse> {
    let request = CreateTokenRequest {
        principal: principal.to_owned(),
        tenant: tenant.to_owned(),
        permissions: permissions.to_vec(),
        ttl_seconds,
    };
    Ok(TokensClient::new(c.channel()).create_token(request).await.context("CreateToken")?.into_inner())
}

pub async fn list(c: &Connection) -> Result<Vec<TokenInfo>> {
    Ok(TokensClient::new(c.channel())
        .list_tokens(ListTokensRequest {})
        .await
        .context("ListTokens")?
        .into_inner()
        .tokens)
}

pub async fn rotate(c: &Connection, id: &str) -> Result<CreateTokenResponse> {
    Ok(TokensClient::new(c.channel())
        .rotate_token(RotateTokenRequest { id: id.to_owned() })
        .await
        .context("RotateToken")?
        .into_inner())
}

pub async fn revoke(c: &Connection, id: &str) -> Result<TokenInfo> {
    Ok(TokensClient::new(c.channel())
        .revoke_token(RevokeTokenRequest { id: id.to_owned() })
        .await
        .context("RevokeToken")?
        .into_inner()
        .info
        .unwrap_or_default())
}

/// One line per token for `kiln token list`.
pub fn describe(token: &TokenInfo) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let state = if token.revoked {
        "revoked".to_owned()
    } else if token.expires_unix_seconds == 0 {
        "active, never expires".to_owned()
    } else if token.expires_unix_seconds <= now {
        "expired".to_owned()
    } else {
        format!("active, expires in {}d", (token.expires_unix_seconds - now) / 86_400)
    };
    format!(
        "{}\t{}\t{}\t{}\t{state}",
        token.id,
        token.principal,
        if token.tenant.is_empty() { "\"\"" } else { &token.tenant },
        token.permissions.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("365d").unwrap(), 365 * 86_400);
        assert_eq!(parse_duration("12h").unwrap(), 43_200);
        assert_eq!(parse_duration("never").unwrap(), 0);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("99999999999999999d").is_err());
    }
}
