//! `portcullis approvals`: a person's view of held calls from a terminal —
//! list them, show one with its arguments, approve or deny it. It acts on
//! the config's approvals store, the one the held calls wait on; whoever can
//! write that file (private to its owner) may decide, and is named in the
//! decision by `--as` or their login name — one of `[approvers]` when any
//! are configured, and one the call's approval rule names.

use crate::approval::store::{self, Approval, Approvals, Refused, State, Verdict};
use crate::config::Config;
use crate::util::clock::now_ms;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::Path;

/// What to do with the approvals.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// List approvals: pending ones, or all with --all.
    List {
        /// Include decided, expired and cancelled approvals.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one approval, with its arguments.
    Show {
        /// The approval's id (or a unique prefix of at least 4 characters).
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a held call: it runs, exactly as shown.
    Approve {
        /// The approval's id (or a unique prefix).
        id: String,
        /// A comment, kept in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a held call: the agent gets an error and the server never sees it.
    Deny {
        /// The approval's id (or a unique prefix).
        id: String,
        /// Why, sent to the agent and kept in the audit trail.
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs `action` on the approvals store of the config at `config`, as
/// `approver` (default: the login name); returns the exit status.
pub fn run(config: &Path, approver: Option<&str>, action: &Action) -> Result<i32> {
    let config = Config::load(config)?;
    let location = config.approvals_store();
    if !store::exists(&location) {
        bail!("no approvals store at {location} yet: no call has been held under this config");
    }
    let store = Approvals::open(&location)?;
    match action {
        Action::List { all, json } => {
            let state = (!all).then_some(State::Pending);
            let approvals = store.list(state, 200)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&approvals)?);
            } else {
                print!("{}", table(&approvals, now_ms()));
            }
        }
        Action::Show { id, json } => {
            let approval = find(&store, id)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&approval)?);
            } else {
                print!("{}", details(&approval, now_ms()));
            }
        }
        Action::Approve { id, reason } => {
            return decide(
                &config,
                &store,
                id,
                Verdict::Approve,
                approver,
                reason.as_deref(),
            );
        }
        Action::Deny { id, reason } => {
            return decide(
                &config,
                &store,
                id,
                Verdict::Deny,
                approver,
                reason.as_deref(),
            );
        }
    }
    Ok(0)
}

fn find(store: &Approvals, id: &str) -> Result<Approval> {
    store
        .find(id)?
        .with_context(|| format!("no approval '{id}' in {}", store.location()))
}

/// Decides a pending approval as `approver` (default: the login name),
/// held to its rule; exit status 1 if the decision was not taken (the
/// approval had ended, or the rule does not let this approver decide).
fn decide(
    config: &Config,
    store: &Approvals,
    id: &str,
    verdict: Verdict,
    approver: Option<&str>,
    reason: Option<&str>,
) -> Result<i32> {
    let by = match approver {
        Some(name) => name.to_string(),
        None => std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .context("say who decides with --as NAME (no USER in the environment)")?,
    };
    if !config.approvers.is_empty() && !config.approvers.contains_key(&by) {
        bail!("'{by}' is not in [approvers]; decide --as one of them");
    }
    match store.decide(id, verdict, &by, reason) {
        Ok(after) if after.state == State::Pending => {
            let needed = after.terms.required as usize - after.votes.len();
            println!(
                "{}: approved by {by}; {needed} more approval(s) needed",
                after.id
            );
            Ok(0)
        }
        Ok(after) => {
            println!(
                "{}: {} by {}",
                after.id,
                after.state.as_str(),
                after.decided_by.as_deref().unwrap_or(&by)
            );
            Ok(i32::from(after.state == State::Expired))
        }
        Err(Refused::Store(e)) => Err(e),
        Err(refused) => {
            println!("{refused}");
            Ok(1)
        }
    }
}

/// One line per approval.
fn table(approvals: &[Approval], now: u64) -> String {
    if approvals.is_empty() {
        return "no approvals\n".into();
    }
    let mut out = format!(
        "{:<36}  {:<9}  {:<16}  {:<12}  {:<24}  {}\n",
        "ID", "STATE", "AGENT", "SERVER", "TOOL", "WAITING"
    );
    for a in approvals {
        out.push_str(&format!(
            "{:<36}  {:<9}  {:<16}  {:<12}  {:<24}  {}\n",
            a.id,
            a.state.as_str(),
            a.call.agent,
            a.call.server,
            a.call.tool.as_deref().unwrap_or(&a.call.method),
            waiting(a, now)
        ));
    }
    out
}

/// How long it has waited and, if pending, how long it has left.
fn waiting(a: &Approval, now: u64) -> String {
    let until = a.decided_ms.unwrap_or(now);
    let waited = until.saturating_sub(a.created_ms) / 1000;
    if a.state == State::Pending {
        let left = a.expires_ms.saturating_sub(now) / 1000;
        format!("{waited} s, expires in {left} s")
    } else {
        format!("{waited} s")
    }
}

/// Everything a person needs to decide.
fn details(a: &Approval, now: u64) -> String {
    let arguments = serde_json::from_str::<serde_json::Value>(&a.call.arguments)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| a.call.arguments.clone());
    let mut out = format!(
        "approval   {}\nstate      {}\nagent      {}\nserver     {}\ncall       {}{}\npolicy     {}\nreason     {}\n",
        a.id,
        a.state.as_str(),
        a.call.agent,
        a.call.server,
        a.call.method,
        a.call
            .tool
            .as_deref()
            .map_or_else(String::new, |t| format!(" {t}")),
        a.call.policy,
        a.call.reason,
    );
    if !a.call.tags.is_empty() {
        out.push_str(&format!("tags       {}\n", a.call.tags.join(", ")));
    }
    out.push_str(&format!("waiting    {}\n", waiting(a, now)));
    for vote in &a.votes {
        let comment = vote
            .comment
            .as_deref()
            .map_or_else(String::new, |c| format!(": {c}"));
        out.push_str(&format!("approved   by {}{comment}\n", vote.approver));
    }
    if a.state == State::Pending && a.terms.required > 1 {
        out.push_str(&format!(
            "needs      {} of {} approvals\n",
            a.terms.required as usize - a.votes.len(),
            a.terms.required
        ));
    }
    if let Some(approvers) = &a.terms.approvers {
        out.push_str(&format!("approvers  {}\n", approvers.join(", ")));
    }
    if let Some(by) = &a.decided_by {
        let comment = a
            .comment
            .as_deref()
            .map_or_else(String::new, |c| format!(": {c}"));
        out.push_str(&format!("decided    by {by}{comment}\n"));
    }
    out.push_str(&format!(
        "arguments  (sha256 {})\n{arguments}\n",
        a.call.arguments_sha256
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(state: State) -> Approval {
        let mut approval = crate::approval::store::tests::approval();
        approval.id = "0192f0aa-0000-7000-8000-000000000001".into();
        (approval.created_ms, approval.expires_ms) = (10_000, 70_000);
        approval.call.agent = "ci-bot".into();
        approval.call.tool = Some("write_file".into());
        approval.call.arguments = r#"{"path":"/srv/a","content":"x"}"#.into();
        approval.state = state;
        approval
    }

    #[test]
    fn a_pending_approval_shows_what_will_run_and_its_time_left() {
        let shown = details(&approval(State::Pending), 25_000);
        assert!(
            shown.contains("call       tools/call write_file"),
            "{shown}"
        );
        assert!(shown.contains("\"path\": \"/srv/a\""), "{shown}");
        assert!(
            shown.contains("waiting    15 s, expires in 45 s"),
            "{shown}"
        );
        assert!(shown.contains("tags       risk:destructive"), "{shown}");
        let listed = table(&[approval(State::Pending)], 25_000);
        assert!(
            listed.lines().nth(1).unwrap().contains("pending    ci-bot"),
            "{listed}"
        );
    }
}
