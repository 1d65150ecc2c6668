//! Portcullis' own listing of each server's tools, so that a policy trusting
//! annotations (read-only, approval gate) judges an agent's first call
//! correctly even when the agent never listed the tools (a 2026-07-28 agent
//! with a cached list, a client that skips `tools/list`). Portcullis is the
//! server's client: it lists every page itself when the connection is
//! ready and again whenever the server says its tools changed, and hands
//! each listing to whoever learns from it (the sessions' relays). Each
//! listing is audited (`tools-surveyed`, with the listing's digest).

use crate::protocol::parsed::Parsed;
use crate::surface::listing::{Paged, ToolPages};
use crate::upstream::Upstream;
use anyhow::{Result, bail};
use serde_json::value::RawValue;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// The first pause before a failed listing is tried again; it doubles up
/// to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Lists `upstream`'s tools now and whenever they change, giving each
/// listing (`{"tools": [...]}`, every page) to `learned`, until `learned`
/// says it no longer wants them or the connection is gone (this does not
/// keep it).
pub async fn keep_surveyed(
    upstream: Weak<Upstream>,
    wait: Duration,
    learned: impl Fn(Arc<RawValue>) -> bool + Send + 'static,
) {
    let Some(mut notices) = upstream.upgrade().map(|u| u.notices()) else {
        return;
    };
    let mut pause = FIRST_PAUSE;
    loop {
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        match offers_tools(&upstream, wait).await {
            Ok(false) => return,
            Ok(true) => match list_tools(&upstream, wait).await {
                Ok(listing) => {
                    pause = FIRST_PAUSE;
                    if !learned(listing) {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        "listing a server's tools failed, trying again in {pause:?}: {e:#}"
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(LONGEST_PAUSE);
                    continue;
                }
            },
            Err(_) => {
                // Not ready yet (starting, or restarting).
                drop(upstream);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
                continue;
            }
        }
        drop(upstream);
        loop {
            match notices.recv().await {
                Ok(notice)
                    if notice.message().method.as_deref()
                        == Some("notifications/tools/list_changed") =>
                {
                    break;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Whether the server offers tools at all.
async fn offers_tools(upstream: &Upstream, wait: Duration) -> Result<bool> {
    let initialized = upstream.initialized(wait).await?;
    Ok(initialized["capabilities"].get("tools").is_some())
}

/// Every page of the server's `tools/list`, as one result.
async fn list_tools(upstream: &Upstream, wait: Duration) -> Result<Arc<RawValue>> {
    let mut pages = ToolPages::default();
    loop {
        let request = pages.request(r#""portcullis-survey""#);
        let request = Parsed::parse(request).map_err(|e| anyhow::anyhow!("{e}"))?;
        let answer = upstream
            .request(&request, wait, None)
            .await?
            .map_err(|unread| anyhow::anyhow!("an unreadable answer: {unread}"))?;
        let Some(result) = answer.message().result else {
            bail!("tools/list failed: {}", answer.text());
        };
        if let Paged::Done(listing) = pages.add(result)? {
            return Ok(listing);
        }
    }
}
