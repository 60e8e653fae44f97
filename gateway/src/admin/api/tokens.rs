//! `/v1/tokens`: the farmer (admin token) mints and revokes deployer tokens.

use super::body::read_object;
use super::error::{json_response, no_content};
use super::{Api, ApiError, Caller};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use meshgate_reservations::clock::now_unix;
use meshgate_reservations::reservation::validate_owner;
use meshgate_reservations::token::{StoredToken, new_token};

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Deployer(_) => Err(ApiError::forbidden(
            "authorization",
            "only the farmer's admin token manages tokens",
        )),
    }
}

/// `POST /v1/tokens {"owner": "alice"}` → the new token, shown this once.
pub(crate) async fn create<B>(
    api: &Api,
    caller: &Caller,
    body: B,
) -> Result<Response<Full<Bytes>>, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    admin_only(caller)?;
    let mut obj = read_object(body).await?;
    let owner = obj.string("owner")?;
    obj.finish()?;
    validate_owner("owner", &owner)?;
    let minted = new_token();
    let stored = StoredToken {
        id: minted.id.clone(),
        owner: owner.clone(),
        hash: minted.hash,
        created_at: now_unix(),
    };
    let created_at = stored.created_at;
    api.blocking(move |s| s.insert_token(&stored)).await??;
    tracing::info!(%owner, id = %minted.id, "deployer token created");
    Ok(json_response(
        StatusCode::CREATED,
        &serde_json::json!({
            "id": minted.id,
            "owner": owner,
            "token": minted.token,
            "created_at": created_at,
        }),
    ))
}

/// `GET /v1/tokens` → ids and owners (never secrets or hashes).
pub(crate) async fn list(api: &Api, caller: &Caller) -> Result<Response<Full<Bytes>>, ApiError> {
    admin_only(caller)?;
    let tokens = api.blocking(|s| s.tokens()).await??;
    let items: Vec<_> = tokens
        .iter()
        .map(|t| serde_json::json!({"id": t.id, "owner": t.owner, "created_at": t.created_at}))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &serde_json::json!({ "tokens": items }),
    ))
}

/// `DELETE /v1/tokens/{id}` → revoked.
pub(crate) async fn delete(
    api: &Api,
    caller: &Caller,
    id: &str,
) -> Result<Response<Full<Bytes>>, ApiError> {
    admin_only(caller)?;
    let id = id.to_string();
    let key = id.clone();
    if api.blocking(move |s| s.delete_token(&key)).await?? {
        tracing::info!(%id, "deployer token revoked");
        Ok(no_content())
    } else {
        Err(ApiError::not_found(
            "id",
            format!("no token with id `{id}`"),
        ))
    }
}
