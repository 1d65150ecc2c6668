//! Telling people a call waits for them: every pending approval is POSTed
//! to the webhook URLs of `[approvals] notify` (a chat's incoming webhook
//! reads the `text` member; anything else gets the whole approval), with a
//! link to it on the admin page. Delivery runs on its own thread, never on
//! the path of a message, and is retried with backoff; a notice that cannot
//! be delivered is logged, and the approval still waits in the store.

use crate::approval::store::Approval;
use crate::util::outbound::{self, HttpClient};
use serde_json::{Value, json};
use std::sync::mpsc;
use std::time::Duration;

/// How many times a notice is tried.
const ATTEMPTS: u32 = 4;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait before the first retry; it doubles after each.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const MAX_RETRY: Duration = Duration::from_secs(8);

/// One notice to deliver.
struct Notice {
    urls: Vec<String>,
    body: String,
}

/// Hands notices to the delivering thread.
pub struct Notifier {
    notices: mpsc::Sender<Notice>,
}

impl Notifier {
    /// Starts the delivering thread.
    pub fn start() -> Self {
        let (notices, queue) = mpsc::channel::<Notice>();
        std::thread::Builder::new()
            .name("approval-notices".into())
            .spawn(move || deliver_all(&queue))
            .expect("cannot start the approval notice thread");
        Self { notices }
    }

    /// Tells `urls` that `approval` waits, linking to `page` (the admin
    /// page's address) when there is one.
    pub fn tell(&self, urls: &[String], approval: &Approval, page: Option<&str>) {
        if urls.is_empty() {
            return;
        }
        let notice = Notice {
            urls: urls.to_vec(),
            body: body(approval, page).to_string(),
        };
        if self.notices.send(notice).is_err() {
            tracing::error!(approval = %approval.id, "the approval notice thread has ended");
        }
    }
}

/// The JSON a webhook receives.
pub fn body(approval: &Approval, page: Option<&str>) -> Value {
    let call = &approval.call;
    let what = match &call.tool {
        Some(tool) => format!("{}/{tool}", call.server),
        None => format!("{} {}", call.server, call.method),
    };
    let link = page.map(|page| format!("{page}/#{}", approval.id));
    let decide = link.clone().unwrap_or_else(|| {
        format!(
            "`portcullis approvals show {}` on the Portcullis host",
            approval.id
        )
    });
    let text = format!(
        "Approval needed: agent {} wants to call {what} ({}: {}). Decide: {decide}",
        call.agent, call.policy, call.reason
    );
    json!({ "text": text, "link": link, "approval": approval })
}

fn deliver_all(queue: &mpsc::Receiver<Notice>) {
    let (runtime, client) = match outbound::sender() {
        Ok(sender) => sender,
        Err(e) => return tracing::error!("approval notices cannot be sent: {e:#}"),
    };
    while let Ok(notice) = queue.recv() {
        for url in &notice.urls {
            runtime.block_on(deliver(&client, url, &notice.body));
        }
    }
}

/// POSTs `body` to `url`, retrying with exponential backoff and jitter.
async fn deliver(client: &HttpClient, url: &str, body: &str) {
    let mut failure = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(outbound::backoff(attempt, FIRST_RETRY, MAX_RETRY)).await;
        }
        let body = body.as_bytes().to_vec();
        match outbound::post(client, url, "application/json", &[], body, ATTEMPT_TIMEOUT).await {
            Ok(()) => return,
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        tracing::warn!(
            url,
            "could not deliver an approval notice after {ATTEMPTS} attempts: {e:#}"
        );
    }
}
