//! The approvals store in PostgreSQL, shared by replicas on many machines:
//! its versioned migrations (applied under an advisory lock, so replicas
//! starting together migrate once), each operation as one transaction, and
//! `LISTEN`/`NOTIFY`, so a decision made on any replica wakes the call held
//! on another at once. Each change notifies channel [`CHANNEL`] with the
//! approval's id when its transaction commits.
//!
//! The blocking `postgres` client drives a runtime of its own, which must
//! not run on an async worker: every call runs on a short-lived thread of
//! its own, the connection lent to it. A dropped connection is made again
//! on the next call; the call that found it dropped fails (a held call is
//! then refused, never let through).

use super::{
    Approval, Backend, COLUMNS, Call, Ending, Hook, Refused, Request, Row, Rule, Ruling, State,
    TooManyPending, Vote, encoded,
};
use anyhow::{Context, Result, anyhow, bail};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, GenericClient};
use postgres_native_tls::MakeTlsConnector;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

/// The channel every change is notified on.
const CHANNEL: &str = "portcullis_approvals";

/// The migrations, in order: migration `n` brings the schema to version
/// `n + 1`. Never edit one that shipped; add the next.
const MIGRATIONS: &[&str] = &["
CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    agent TEXT NOT NULL,
    server TEXT NOT NULL,
    method TEXT NOT NULL,
    tool TEXT,
    arguments_sha256 TEXT NOT NULL,
    arguments TEXT NOT NULL,
    policy TEXT NOT NULL,
    reason TEXT NOT NULL,
    tags TEXT NOT NULL,
    state TEXT NOT NULL,
    decided_by TEXT,
    decided_ms BIGINT,
    comment TEXT,
    holder TEXT NOT NULL,
    approvers TEXT,
    required BIGINT NOT NULL,
    reuse_ms BIGINT NOT NULL,
    elicit BOOLEAN NOT NULL,
    used_ms BIGINT
);
CREATE INDEX approvals_state ON approvals (state, created_ms);
CREATE INDEX approvals_reuse ON approvals (agent, server, arguments_sha256, state);
CREATE INDEX approvals_agent ON approvals (agent, state);
CREATE TABLE approval_votes (
    approval TEXT NOT NULL REFERENCES approvals (id),
    approver TEXT NOT NULL,
    decided_ms BIGINT NOT NULL,
    comment TEXT,
    PRIMARY KEY (approval, approver)
);
CREATE TABLE approval_keys (name TEXT PRIMARY KEY, key BYTEA NOT NULL);
"];

/// The newest schema version.
pub(super) const LATEST: u32 = MIGRATIONS.len() as u32;

/// The advisory lock migrations are applied under.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c;

/// How long one statement may run before it fails.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the listener waits before connecting again after losing its
/// connection.
const RECONNECT: Duration = Duration::from_secs(1);

/// How long a call waits for the connection another call is using before
/// it fails (closed: the held call is refused), so a database that stops
/// answering ties up one thread per replica, not every one.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// How long data sent may go unacknowledged before the connection counts as
/// lost (a database or network that silently stopped).
const UNACKNOWLEDGED: Duration = Duration::from_secs(10);

/// How to reach the database.
#[derive(Clone)]
struct Target {
    config: postgres::Config,
    tls: MakeTlsConnector,
    /// The URL without its password, for messages.
    shown: String,
}

impl Target {
    /// The target `url` names once its `${env:}`/`${file:}` references are
    /// resolved against `base`.
    fn parse(url: &str, base: &Path) -> Result<Self> {
        let resolved = crate::config::resolve_secret(url, base).context("approvals.store")?;
        let mut config = postgres::Config::from_str(&resolved)
            .map_err(|e| anyhow!("approvals.store: not a PostgreSQL URL ({e})"))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(UNACKNOWLEDGED)
            .application_name("portcullis");
        // A database off this machine is reached over TLS unless the URL
        // says otherwise: a peer on the path must not answer for it.
        if !resolved.contains("sslmode=") && !local(&config) {
            config.ssl_mode(postgres::config::SslMode::Require);
        }
        let tls = native_tls::TlsConnector::builder()
            .build()
            .context("cannot set up TLS for PostgreSQL")?;
        let shown = crate::config::StoreLocation::redacted(&resolved);
        Ok(Self {
            config,
            tls: MakeTlsConnector::new(tls),
            shown,
        })
    }

    /// A new connection, its statements bounded by [`STATEMENT_TIMEOUT`].
    /// Runs on a thread of its own (see the module's comment).
    fn connect(&self) -> Result<Client> {
        off_runtime(|| {
            let mut client = self
                .config
                .connect(self.tls.clone())
                .with_context(|| format!("cannot connect to the approvals store {}", self.shown))?;
            client.batch_execute(&format!(
                "SET statement_timeout = {}; SET client_min_messages = warning",
                STATEMENT_TIMEOUT.as_millis()
            ))?;
            Ok(client)
        })
    }
}

/// Whether every host `config` names is this machine (loopback or a Unix
/// socket).
fn local(config: &postgres::Config) -> bool {
    config.get_hosts().iter().all(|host| match host {
        postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        postgres::config::Host::Unix(_) => true,
    })
}

/// Runs `work` on a thread of its own, off any async runtime.
fn off_runtime<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(work)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The schema version of the database `url` names, read without changing
/// it; `None` when Portcullis has made no tables there yet.
pub(super) fn version(url: &str, base: &Path) -> Result<Option<u32>> {
    let target = Target::parse(url, base)?;
    let mut client = target.connect()?;
    off_runtime(|| {
        let exists: bool = client
            .query_one("SELECT to_regclass('approvals_schema') IS NOT NULL", &[])?
            .try_get(0)?;
        if !exists {
            return Ok(None);
        }
        let version: i32 = client
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM approvals_schema",
                &[],
            )?
            .try_get(0)?;
        Ok(Some(version as u32))
    })
}

/// Brings the schema up to date, once, whichever replica comes first.
fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS approvals_schema \
         (version INTEGER PRIMARY KEY, applied_ms BIGINT NOT NULL)",
    )?;
    let version: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM approvals_schema",
            &[],
        )?
        .try_get(0)?;
    if version as u32 > LATEST {
        bail!(
            "its schema version {version} is newer than this Portcullis knows ({LATEST}): \
             a newer Portcullis migrated it"
        );
    }
    for (done, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(migration)
            .with_context(|| format!("migration to schema version {} failed", done + 1))?;
        tx.execute(
            "INSERT INTO approvals_schema (version, applied_ms) VALUES ($1, $2)",
            &[&(done as i32 + 1), &(crate::util::clock::now_ms() as i64)],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// The store in a PostgreSQL database.
pub(super) struct Postgres {
    target: Target,
    /// The connection, made again when it was lost.
    client: Mutex<Option<Client>>,
}

impl Postgres {
    /// Connects to the database `url` names (references resolved against
    /// `base`) and migrates it.
    pub(super) fn open(url: &str, base: &Path) -> Result<Self> {
        let target = Target::parse(url, base)?;
        let mut client = target.connect()?;
        off_runtime(|| migrate(&mut client))
            .with_context(|| format!("{} is not an approvals store", target.shown))?;
        Ok(Self {
            target,
            client: Mutex::new(Some(client)),
        })
    }

    /// Runs `work` with the connection, off any async runtime; a connection
    /// found closed is dropped, and made again by the next call.
    fn with<T: Send>(&self, work: impl FnOnce(&mut Client) -> Result<T> + Send) -> Result<T> {
        let mut slot = self.connection()?;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.target.connect()?);
        }
        let client = slot.as_mut().expect("connected above");
        let done = off_runtime(|| work(client));
        if client.is_closed() {
            *slot = None;
        }
        // The database's own errors name the store; the store's refusals
        // (too many pending) speak for themselves.
        done.map_err(|e| match e.is::<postgres::Error>() {
            true => e.context(format!("the approvals store {} failed", self.target.shown)),
            false => e,
        })
    }

    /// The connection, once no other call uses it, for at most
    /// [`LOCK_WAIT`].
    fn connection(&self) -> Result<std::sync::MutexGuard<'_, Option<Client>>> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match self.client.try_lock() {
                Ok(slot) => return Ok(slot),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    return Ok(poisoned.into_inner());
                }
                Err(std::sync::TryLockError::WouldBlock)
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(std::sync::TryLockError::WouldBlock) => bail!(
                    "the approvals store {} is not answering: another call has had it for \
                     over {LOCK_WAIT:?}",
                    self.target.shown
                ),
            }
        }
    }

    /// Runs `work` in a transaction that notifies [`CHANNEL`] of `id` when
    /// it commits.
    fn changing<T: Send>(
        &self,
        id: &str,
        work: impl FnOnce(&mut postgres::Transaction) -> Result<T> + Send,
    ) -> Result<T> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            let done = work(&mut tx)?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &id])?;
            tx.commit()?;
            Ok(done)
        })
    }
}

impl Backend for Postgres {
    fn insert(&self, request: &Request, now: u64) -> Result<Approval> {
        let expires = now + request.expires_in.as_millis() as u64;
        let (call, terms) = (&request.call, &request.terms);
        let (tags, approvers) = encoded(request)?;
        self.changing(&request.id, |tx| {
            if request.max_pending > 0 {
                // One agent's requests are counted one at a time, whichever
                // replica makes them.
                tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&call.agent])?;
                let pending: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM approvals WHERE agent = $1 \
                         AND state = 'pending' AND expires_ms > $2",
                        &[&call.agent, &(now as i64)],
                    )?
                    .try_get(0)?;
                if pending >= i64::from(request.max_pending) {
                    return Err(TooManyPending {
                        agent: call.agent.clone(),
                        limit: request.max_pending,
                    }
                    .into());
                }
            }
            tx.execute(
                &format!(
                    "INSERT INTO approvals ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                     $9, $10, $11, $12, 'pending', NULL, NULL, NULL, $13, $14, $15, $16, $17, \
                     NULL)"
                ),
                &[
                    &request.id,
                    &(now as i64),
                    &(expires as i64),
                    &call.agent,
                    &call.server,
                    &call.method,
                    &call.tool,
                    &call.arguments_sha256,
                    &call.arguments,
                    &call.policy,
                    &call.reason,
                    &tags,
                    &request.holder,
                    &approvers,
                    &i64::from(terms.required),
                    &(terms.reuse_ms as i64),
                    &request.elicit,
                ],
            )
            .context("cannot record the approval")?;
            fetch(tx, &request.id)?.context("the approval vanished as it was recorded")
        })
    }

    fn fetch(&self, id: &str) -> Result<Option<Approval>> {
        self.with(|client| fetch(client, id))
    }

    fn ids_starting(&self, prefix: &str) -> Result<Vec<String>> {
        self.with(|client| {
            let rows = client.query(
                "SELECT id FROM approvals WHERE left(id, length($1)) = $1 LIMIT 2",
                &[&prefix],
            )?;
            rows.iter().map(|r| Ok(r.try_get(0)?)).collect()
        })
    }

    fn ended_among(&self, ids: &[String]) -> Result<Vec<Approval>> {
        self.with(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' AND id = ANY($1)"
                ),
                &[&ids],
            )?;
            collect(client, &rows)
        })
    }

    fn consume(&self, id: &str, now: u64) -> Result<bool> {
        self.changing(id, |tx| {
            let used = tx.execute(
                "UPDATE approvals SET used_ms = $2 WHERE id = $1 AND state = 'approved' \
                 AND used_ms IS NULL",
                &[&id, &(now as i64)],
            )?;
            Ok(used == 1)
        })
    }

    fn expire_overdue(&self, now: u64) -> Result<usize> {
        // Replicas are told only when something expired.
        self.with(|client| {
            let mut tx = client.transaction()?;
            let expired = tx.execute(
                "UPDATE approvals SET state = 'expired', decided_by = 'portcullis', \
                 decided_ms = expires_ms, comment = $2 WHERE state = 'pending' \
                 AND expires_ms <= $1",
                &[&(now as i64), &super::EXPIRED],
            )?;
            if expired > 0 {
                tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])?;
            }
            tx.commit()?;
            Ok(expired as usize)
        })
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>> {
        let state = state.map(State::as_str);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {COLUMNS} FROM approvals WHERE $1::TEXT IS NULL OR state = $1 \
                     ORDER BY created_ms DESC, id DESC LIMIT $2"
                ),
                &[&state, &limit],
            )?;
            collect(client, &rows)
        })
    }

    fn recent(&self, limit: usize) -> Result<Vec<Approval>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
                     ORDER BY decided_ms DESC, id DESC LIMIT $1"
                ),
                &[&limit],
            )?;
            collect(client, &rows)
        })
    }

    fn reusable(&self, call: &Call, now: u64) -> Result<Option<Approval>> {
        self.with(|client| {
            let id: Option<String> = client
                .query_opt(
                    "SELECT id FROM approvals WHERE state = 'approved' AND agent = $1 \
                     AND server = $2 AND method = $3 AND tool IS NOT DISTINCT FROM $4 \
                     AND arguments_sha256 = $5 AND reuse_ms > 0 \
                     AND decided_ms + reuse_ms > $6 ORDER BY decided_ms DESC LIMIT 1",
                    &[
                        &call.agent,
                        &call.server,
                        &call.method,
                        &call.tool,
                        &call.arguments_sha256,
                        &(now as i64),
                    ],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            id.map_or(Ok(None), |id| fetch(client, &id))
        })
    }

    fn decide(&self, id: &str, rule: Rule) -> Result<Approval, Refused> {
        // The rule's refusal is carried out of the transaction, which it
        // rolls back.
        let mut refused = None;
        let decided = self.changing(id, |tx| {
            tx.execute("SELECT id FROM approvals WHERE id = $1 FOR UPDATE", &[&id])?;
            let Some(current) = fetch(tx, id)? else {
                refused = Some(Refused::Unknown(id.to_string()));
                bail!("refused");
            };
            match rule(&current) {
                Err(refusal) => {
                    refused = Some(refusal);
                    bail!("refused");
                }
                Ok(Ruling::End(ending)) => end(tx, id, &ending)?,
                Ok(Ruling::Vote { vote, then }) => {
                    tx.execute(
                        "INSERT INTO approval_votes (approval, approver, decided_ms, comment) \
                         VALUES ($1, $2, $3, $4)",
                        &[
                            &id,
                            &vote.approver,
                            &(vote.decided_ms as i64),
                            &vote.comment,
                        ],
                    )?;
                    if let Some(ending) = then {
                        end(tx, id, &ending)?;
                    }
                }
            }
            fetch(tx, id)?.context("the approval vanished as it was decided")
        });
        match (decided, refused) {
            (_, Some(refusal)) => Err(refusal),
            (decided, None) => Ok(decided?),
        }
    }

    fn end(&self, id: &str, ending: &Ending) -> Result<()> {
        self.changing(id, |tx| end(tx, id, ending))
    }

    fn receipt_key(&self) -> Result<[u8; 32]> {
        let fresh: [u8; 32] = rand::random();
        let key: Vec<u8> = self.with(|client| {
            client.execute(
                "INSERT INTO approval_keys (name, key) VALUES ('receipts', $1) \
                 ON CONFLICT (name) DO NOTHING",
                &[&&fresh[..]],
            )?;
            Ok(client
                .query_one("SELECT key FROM approval_keys WHERE name = 'receipts'", &[])?
                .try_get(0)?)
        })?;
        key.try_into()
            .map_err(|_| anyhow!("the receipt key is not 32 bytes"))
    }

    fn watch(&self, hook: Hook) -> Result<bool> {
        let target = self.target.clone();
        std::thread::Builder::new()
            .name("portcullis-approvals-listen".into())
            .spawn(move || listen(&target, &hook))
            .context("cannot start listening to the approvals store")?;
        Ok(true)
    }
}

/// Tells `hook` of every change notified on [`CHANNEL`], for the life of
/// the process; after losing its connection it connects again and tells
/// `hook` once, for what it may have missed.
fn listen(target: &Target, hook: &Hook) {
    loop {
        match target.connect().and_then(|mut client| {
            client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            hook();
            relay(&mut client, hook)
        }) {
            Ok(()) => {}
            Err(e) => tracing::warn!("listening to the approvals store: {e:#}; trying again"),
        }
        std::thread::sleep(RECONNECT);
    }
}

/// Tells `hook` of the notifications arriving on `client` (each burst
/// once), until the connection fails.
fn relay(client: &mut Client, hook: &Hook) -> Result<()> {
    loop {
        let mut notifications = client.notifications();
        let mut arriving = notifications.blocking_iter();
        match arriving.next() {
            Ok(Some(_)) => {}
            Ok(None) => bail!("the connection closed"),
            Err(e) => return Err(e.into()),
        }
        drop(arriving);
        while let Ok(Some(_)) = notifications.iter().next() {}
        hook();
    }
}

/// Approval `id` exactly, with its votes.
fn fetch(client: &mut impl GenericClient, id: &str) -> Result<Option<Approval>> {
    let row = client.query_opt(
        &format!("SELECT {COLUMNS} FROM approvals WHERE id = $1"),
        &[&id],
    )?;
    row.map(|row| with_votes(client, read(&row)?)).transpose()
}

/// The approvals `rows` hold, each with its votes.
fn collect(client: &mut impl GenericClient, rows: &[postgres::Row]) -> Result<Vec<Approval>> {
    rows.iter()
        .map(|row| with_votes(client, read(row)?))
        .collect()
}

/// `approval` with its votes, in the order given.
fn with_votes(client: &mut impl GenericClient, mut approval: Approval) -> Result<Approval> {
    let rows = client.query(
        "SELECT approver, decided_ms, comment FROM approval_votes WHERE approval = $1 \
         ORDER BY decided_ms, approver",
        &[&approval.id],
    )?;
    approval.votes = rows
        .iter()
        .map(|r| {
            Ok(Vote {
                approver: r.try_get(0)?,
                decided_ms: r.try_get::<_, i64>(1)? as u64,
                comment: r.try_get(2)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(approval)
}

/// The approval a row of [`COLUMNS`] holds.
fn read(row: &postgres::Row) -> Result<Approval> {
    Row {
        id: row.try_get(0)?,
        created_ms: row.try_get(1)?,
        expires_ms: row.try_get(2)?,
        agent: row.try_get(3)?,
        server: row.try_get(4)?,
        method: row.try_get(5)?,
        tool: row.try_get(6)?,
        arguments_sha256: row.try_get(7)?,
        arguments: row.try_get(8)?,
        policy: row.try_get(9)?,
        reason: row.try_get(10)?,
        tags: row.try_get(11)?,
        state: row.try_get(12)?,
        decided_by: row.try_get(13)?,
        decided_ms: row.try_get(14)?,
        comment: row.try_get(15)?,
        holder: row.try_get(16)?,
        approvers: row.try_get(17)?,
        required: row.try_get(18)?,
        reuse_ms: row.try_get(19)?,
        elicit: row.try_get(20)?,
        used_ms: row.try_get(21)?,
    }
    .parse()
}

/// Ends pending approval `id` as `ending` says.
fn end(client: &mut impl GenericClient, id: &str, ending: &Ending) -> Result<()> {
    client.execute(
        "UPDATE approvals SET state = $2, decided_by = $3, decided_ms = $4, comment = $5 \
         WHERE id = $1 AND state = 'pending'",
        &[
            &id,
            &ending.state.as_str(),
            &ending.by,
            &(ending.at as i64),
            &ending.comment,
        ],
    )?;
    Ok(())
}
