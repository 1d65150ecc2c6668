//! Receipts for approvals that a client carries: the `requestState` of a
//! 2026-07-28 `input_required` answer. The client sends it back with the
//! request and its user's answer; everything in it is the client's to
//! tamper with, so it is sealed (HMAC-SHA256 under the approvals store's
//! key) and bound to the approval, the agent, the call (server, method,
//! tool and the digest of the arguments) and the approval's expiry. A
//! receipt that does not open, belongs to another agent or call, or has
//! expired is refused; that the call it approves runs once is the store's
//! part ([`crate::approval::store::Approvals::consume`]).

use crate::approval::store::{Approval, Call};
use crate::util::encode::hex;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a receipt starts with: its format's version.
const VERSION: &str = "pcr1";
/// The longest text taken for a receipt (a real one is about 300 bytes and
/// a third of the agent's id).
const MAX_LEN: usize = 8192;

/// What a receipt says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The approval it is for.
    pub approval: String,
    /// The agent it was issued to.
    pub agent: String,
    /// sha256 of the call it approves ([`call_digest`]).
    pub call: String,
    /// When it stops being honoured, in ms since the epoch.
    pub expires_ms: u64,
}

/// Why a receipt is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// Not a receipt, or not one sealed with this store's key.
    Forged,
    /// Past its approval's expiry.
    Expired,
    /// Issued to another agent or for another call.
    OtherCall,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Invalid::Forged => "requestState is not a receipt Portcullis issued",
            Invalid::Expired => "requestState has expired; send the call again without it",
            Invalid::OtherCall => "requestState was issued for another agent or call",
        })
    }
}

impl std::error::Error for Invalid {}

/// The receipt for `approval`, for its agent to carry back.
pub fn seal(key: &[u8; 32], approval: &Approval) -> String {
    let claims = Claims {
        approval: approval.id.clone(),
        agent: approval.call.agent.clone(),
        call: call_digest(&approval.call),
        expires_ms: approval.expires_ms,
    };
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
    let signed = format!("{VERSION}.{payload}");
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Opens `receipt` for `call` at `now_ms`: its claims, if it was sealed
/// with `key` for exactly this agent and call and has not expired.
pub fn open(key: &[u8; 32], receipt: &str, call: &Call, now_ms: u64) -> Result<Claims, Invalid> {
    if receipt.len() > MAX_LEN {
        return Err(Invalid::Forged);
    }
    let (signed, tag) = receipt.rsplit_once('.').ok_or(Invalid::Forged)?;
    let payload = signed
        .strip_prefix(VERSION)
        .and_then(|rest| rest.strip_prefix('.'))
        .ok_or(Invalid::Forged)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Invalid::Forged)?;
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, key),
        signed.as_bytes(),
        &tag,
    )
    .map_err(|_| Invalid::Forged)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .ok_or(Invalid::Forged)?;
    if claims.agent != call.agent || claims.call != call_digest(call) {
        return Err(Invalid::OtherCall);
    }
    if now_ms >= claims.expires_ms {
        return Err(Invalid::Expired);
    }
    Ok(claims)
}

/// What binds a receipt to its call: sha256 over the server, method, tool
/// and arguments' digest.
fn call_digest(call: &Call) -> String {
    let bound = serde_json::json!([call.server, call.method, call.tool, call.arguments_sha256]);
    hex(&Sha256::digest(bound.to_string().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn approval() -> Approval {
        crate::approval::store::tests::approval()
    }

    #[test]
    fn a_receipt_opens_for_its_own_call() {
        let approval = approval();
        let receipt = seal(&KEY, &approval);
        assert!(receipt.starts_with("pcr1."));
        let claims = open(&KEY, &receipt, &approval.call, 1).unwrap();
        assert_eq!(claims.approval, approval.id);
        assert_eq!(claims.agent, "bot");
    }

    #[test]
    fn a_forged_or_altered_receipt_is_refused() {
        let approval = approval();
        let receipt = seal(&KEY, &approval);
        let call = &approval.call;
        assert_eq!(open(&[8; 32], &receipt, call, 1), Err(Invalid::Forged));
        assert_eq!(open(&KEY, &approval.id, call, 1), Err(Invalid::Forged));
        assert_eq!(open(&KEY, "pcr1..", call, 1), Err(Invalid::Forged));
        // Another approval's id in the claims, the tag kept.
        let (signed, tag) = receipt.rsplit_once('.').unwrap();
        let mut claims: Claims = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(signed.strip_prefix("pcr1.").unwrap())
                .unwrap(),
        )
        .unwrap();
        claims.approval = "another".into();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let altered = format!("pcr1.{payload}.{tag}");
        assert_eq!(open(&KEY, &altered, call, 1), Err(Invalid::Forged));
        assert_eq!(
            open(&KEY, &"x".repeat(MAX_LEN + 1), call, 1),
            Err(Invalid::Forged)
        );
    }

    #[test]
    fn a_receipt_is_bound_to_its_agent_call_and_expiry() {
        let approval = approval();
        let receipt = seal(&KEY, &approval);
        let mut other_agent = approval.call.clone();
        other_agent.agent = "mallory".into();
        assert_eq!(
            open(&KEY, &receipt, &other_agent, 1),
            Err(Invalid::OtherCall)
        );
        let mut other_arguments = approval.call.clone();
        other_arguments.arguments_sha256 = "cd".into();
        assert_eq!(
            open(&KEY, &receipt, &other_arguments, 1),
            Err(Invalid::OtherCall)
        );
        let mut other_tool = approval.call.clone();
        other_tool.tool = Some("write".into());
        assert_eq!(
            open(&KEY, &receipt, &other_tool, 1),
            Err(Invalid::OtherCall)
        );
        assert_eq!(
            open(&KEY, &receipt, &approval.call, approval.expires_ms),
            Err(Invalid::Expired)
        );
    }
}
