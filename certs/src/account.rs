//! The ACME account: loaded from the backend, or registered once under the backend's account
//! lock (gateways of a fleet starting together register one account, not one each) and
//! saved through the lock's guard, so a holder that lost the lock saves nothing.

use crate::backend::{AccountLock, CertBackend};
use crate::error::IssueError;
use instant_acme::{Account, AccountBuilder, AccountCredentials, NewAccount};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// The account as persisted (mode 0600, or sealed in a fleet): reused while directory and
/// key stay the same.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    contact: String,
    credentials: AccountCredentials,
}

/// How long a gateway waits for another one registering the account (a registration takes
/// a second; a holder that died loses the lock with its lease, `tls.acme.lock_ttl_secs`).
const WAIT_FOR_HOLDER: Duration = Duration::from_secs(120);
/// How often a waiting gateway looks for the account again.
const RETRY: Duration = Duration::from_millis(500);

/// The account stored in `store` for `directory`, or a new one registered with `contact`.
/// `ca_root` is trusted for the server's HTTPS.
pub(crate) async fn connect(
    directory: &str,
    contact: &str,
    ca_root: Option<&Path>,
    store: &dyn CertBackend,
) -> Result<Account, IssueError> {
    let builder = || match ca_root {
        Some(root) => Account::builder_with_root(root)
            .map_err(|e| IssueError::acme(format!("ACME CA root {}", root.display()), &e)),
        None => Account::builder().map_err(|e| IssueError::acme("ACME HTTPS client", &e)),
    };
    let started = Instant::now();
    loop {
        if let Some(saved) = stored(store, directory).await? {
            return reuse(builder()?, saved, directory, contact, store).await;
        }
        match store
            .lock_account()
            .await
            .map_err(|e| IssueError::new(format!("ACME account lock: {e}")))?
        {
            AccountLock::Acquired(guard) => {
                // Another gateway may have saved one between the read and the lock.
                if let Some(saved) = stored(store, directory).await? {
                    return reuse(builder()?, saved, directory, contact, store).await;
                }
                let (account, credentials) = builder()?
                    .create(
                        &NewAccount {
                            contact: &[contact],
                            terms_of_service_agreed: true,
                            only_return_existing: false,
                        },
                        directory.to_string(),
                        None,
                    )
                    .await
                    .map_err(|e| {
                        IssueError::acme(
                            format!(
                                "registering ACME account with contact {contact:?} at {directory}"
                            ),
                            &e,
                        )
                    })?;
                let json = encode(&StoredAccount {
                    directory: directory.to_string(),
                    contact: contact.to_string(),
                    credentials,
                })?;
                guard
                    .save(&json)
                    .await
                    .map_err(|e| IssueError::new(format!("saving the ACME account: {e}")))?;
                tracing::info!(%directory, id = account.id(), "registered ACME account");
                return Ok(account);
            }
            AccountLock::Busy { holder } => {
                if started.elapsed() > WAIT_FOR_HOLDER {
                    return Err(IssueError::new(format!(
                        "the ACME account is being registered by {holder}, not done after {} s",
                        WAIT_FOR_HOLDER.as_secs()
                    )));
                }
                tracing::debug!(%holder, "another gateway registers the ACME account; waiting");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// The stored account, if there is a readable one for `directory`.
async fn stored(
    store: &dyn CertBackend,
    directory: &str,
) -> Result<Option<StoredAccount>, IssueError> {
    let text = store
        .read_account()
        .await
        .map_err(|e| IssueError::new(e.to_string()))?;
    Ok(text
        .and_then(|text| match serde_json::from_str::<StoredAccount>(&text) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(
                    "ACME account in {}: unreadable ({e}); registering a new one",
                    store.describe()
                );
                None
            }
        })
        .filter(|a| a.directory == directory))
}

/// Logs in with the stored credentials; a changed contact is updated at the server and in
/// the stored copy (the credentials stay).
async fn reuse(
    builder: AccountBuilder,
    saved: StoredAccount,
    directory: &str,
    contact: &str,
    store: &dyn CertBackend,
) -> Result<Account, IssueError> {
    let contact_changed = saved.contact != contact;
    let account = builder
        .from_credentials(saved.credentials)
        .await
        .map_err(|e| IssueError::acme(format!("ACME directory {directory}"), &e))?;
    if contact_changed {
        account.update_contacts(&[contact]).await.map_err(|e| {
            IssueError::acme(format!("updating ACME account contact to {contact:?}"), &e)
        })?;
        if let Some(mut a) = stored(store, directory).await? {
            a.contact = contact.to_string();
            store
                .write_account(&encode(&a)?)
                .await
                .map_err(|e| IssueError::new(e.to_string()))?;
        }
    }
    tracing::info!(%directory, id = account.id(), "reusing stored ACME account");
    Ok(account)
}

fn encode(account: &StoredAccount) -> Result<Vec<u8>, IssueError> {
    serde_json::to_vec_pretty(account)
        .map_err(|e| IssueError::new(format!("serializing ACME account: {e}")))
}
