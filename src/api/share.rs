//! Routes for sharing between homes: pairing homes, sharing and unsharing entities, and
//! the audit log.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::more::ApiQuery;
use super::{ApiError, ApiJson, ApiState};
use crate::shares::{AuditEntry, KnownHome, PairedWith, ShareOut, SharedList, Shares};

fn shares(state: &ApiState) -> Shares {
    Shares {
        core: state.core.clone(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PairBody {
    code: String,
}

/// `POST /api/pair`: pairs this home with the home that issued a home code.
pub(super) async fn pair(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<PairBody>,
) -> Result<Json<PairedWith>, ApiError> {
    match shares(&state).pair(&body.code).await {
        Ok(paired) => Ok(Json(paired)),
        // A code that is used up or expired is a conflict; anything else wrong with it
        // (a typo, a forgery, an issuer that refused the proof) is a bad request.
        Err(crate::Error::Pairing(detail))
            if detail.contains("expired") || detail.contains("used") =>
        {
            Err(ApiError::new(StatusCode::CONFLICT, "conflict", detail))
        }
        Err(crate::Error::Pairing(detail)) => Err(ApiError::bad_request(detail)),
        Err(other) => Err(other.into()),
    }
}

#[derive(Serialize)]
pub(super) struct HomesReply {
    homes: Vec<KnownHome>,
}

/// `GET /api/homes`.
pub(super) async fn homes(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<HomesReply>, ApiError> {
    Ok(Json(HomesReply {
        homes: shares(&state).homes().await?,
    }))
}

/// `DELETE /api/homes/{home}`.
pub(super) async fn forget(
    State(state): State<Arc<ApiState>>,
    Path(home): Path<String>,
) -> Result<Json<PairedWith>, ApiError> {
    Ok(Json(shares(&state).forget(&home).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ShareBody {
    entity_id: String,
    home: String,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    policy: Option<String>,
}

/// `POST /api/shares`.
pub(super) async fn share(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<ShareBody>,
) -> Result<Json<ShareOut>, ApiError> {
    Ok(Json(
        shares(&state)
            .share_request(body.entity_id, &body.home, body.read_only, body.policy)
            .await?,
    ))
}

/// `DELETE /api/shares/{id}/{home}`.
pub(super) async fn unshare(
    State(state): State<Arc<ApiState>>,
    Path((id, home)): Path<(String, String)>,
) -> Result<Json<ShareOut>, ApiError> {
    Ok(Json(shares(&state).unshare(&id, &home).await?))
}

/// `GET /api/shares`.
pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Result<Json<SharedList>, ApiError> {
    Ok(Json(shares(&state).list().await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuditQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    before: Option<String>,
}

/// Entries in one page of `GET /api/audit` unless `limit` says otherwise.
pub(crate) const DEFAULT_AUDIT_PAGE: usize = 1_000;
/// Most entries one page returns.
pub(crate) const MAX_AUDIT_PAGE: usize = 10_000;

#[derive(Serialize)]
pub(super) struct AuditReply {
    entries: Vec<AuditEntry>,
    /// The cursor for the older entries (`?before=`), null when there are none.
    next_before: Option<String>,
}

/// `GET /api/audit?since=RFC3339|DURATION&limit=N&before=CURSOR`: the newest `limit`
/// entries (before the cursor), oldest first.
pub(super) async fn audit(
    State(state): State<Arc<ApiState>>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<Json<AuditReply>, ApiError> {
    let since_ms = match q.since.as_deref() {
        None | Some("") => 0,
        Some(text) => parse_since(text, crate::core::now_ms()).map_err(ApiError::bad_request)?,
    };
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit {limit} is out of range; use 1 to {MAX_AUDIT_PAGE}"
        )));
    }
    let page = state
        .store
        .audit_page(
            since_ms,
            q.before.as_deref().filter(|b| !b.is_empty()),
            limit,
        )
        .await?;
    Ok(Json(AuditReply {
        entries: page.entries,
        next_before: page.next_before,
    }))
}

/// `since` as an RFC 3339 time or a duration back from now (`90s`, `15m`, `2h`, `1d`).
pub(crate) fn parse_since(text: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        let ms = t.unix_timestamp_nanos() / 1_000_000;
        return Ok(u64::try_from(ms.max(0)).unwrap_or(0));
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (n, unit) = text.split_at(split);
    let n: u64 = n.parse().map_err(|_| {
        format!("since {text:?} is neither an RFC 3339 time nor a duration like 15m")
    })?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("unknown unit in {text:?}; use s, m, h or d")),
    };
    Ok(now_ms.saturating_sub(n.saturating_mul(unit_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        assert_eq!(parse_since("90s", 100_000), Ok(10_000));
        assert_eq!(parse_since("1h", 10_000_000), Ok(10_000_000 - 3_600_000));
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert!(parse_since("yesterday", 0).is_err());
        assert!(parse_since("5y", 0).is_err());
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyBody {
    policy: String,
}

/// `PUT /api/entities/{id}/policy`.
pub(super) async fn set_policy(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> Result<Json<crate::Entity>, ApiError> {
    let entities = crate::Entities {
        core: state.core.clone(),
    };
    // The core reads the policy before anything else, so parsing it here first refuses
    // the same requests with the same words.
    let policy: crate::Policy = body.policy.parse()?;
    Ok(Json(entities.set_policy(&id, policy).await?))
}

#[derive(Serialize)]
pub(super) struct ConflictsReply {
    conflicts: Vec<crate::ConflictInfo>,
}

/// `GET /api/conflicts`.
pub(super) async fn conflicts(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<ConflictsReply>, ApiError> {
    let entities = crate::Entities {
        core: state.core.clone(),
    };
    Ok(Json(ConflictsReply {
        conflicts: entities.conflicts().await?,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResolveBody {
    entity_id: String,
    field: String,
    choice: usize,
}

/// `POST /api/conflicts/resolve`.
pub(super) async fn resolve(
    State(state): State<Arc<ApiState>>,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<Json<crate::Entity>, ApiError> {
    let entities = crate::Entities {
        core: state.core.clone(),
    };
    Ok(Json(
        entities
            .resolve(&body.entity_id, &body.field, body.choice)
            .await?,
    ))
}

/// `POST /api/devices/{id}/revoke`: revokes a device of this home (admin device only).
pub(super) async fn revoke_device(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<crate::RevokedDevice>, ApiError> {
    let device = id;
    let result = state
        .core
        .call(|reply| crate::revocation::service::RevocationRequest::RevokeDevice { device, reply })
        .await??;
    Ok(Json(result))
}
