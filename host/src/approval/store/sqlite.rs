//! The approvals store in one SQLite file, shared by the Portcullis
//! processes of one machine: its schema, its versioned migrations, the
//! switch to write-ahead logging, and each operation as one transaction.
//! Other processes' changes are not notified; they are looked for.

use super::{
    Approval, Backend, COLUMNS, Call, Hook, Request, Row, Rule, Ruling, State, TooManyPending,
    Vote, encoded,
};
use super::{Ending, Refused};
use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
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
    decided_ms INTEGER,
    comment TEXT,
    holder TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_state ON approvals (state, created_ms);
";

/// Version 1: the rule's terms and the votes of a two-person rule.
pub(super) const SCHEMA_1: &str = "
ALTER TABLE approvals ADD COLUMN approvers TEXT;
ALTER TABLE approvals ADD COLUMN required INTEGER NOT NULL DEFAULT 1;
ALTER TABLE approvals ADD COLUMN reuse_ms INTEGER NOT NULL DEFAULT 0;
CREATE TABLE votes (
    approval TEXT NOT NULL REFERENCES approvals (id),
    approver TEXT NOT NULL,
    decided_ms INTEGER NOT NULL,
    comment TEXT,
    PRIMARY KEY (approval, approver)
);
CREATE INDEX approvals_reuse ON approvals (agent, server, arguments_sha256, state);
PRAGMA user_version = 1;
";

/// Version 2: who may decide through the client, single-use receipts and
/// their key, and counting an agent's pending approvals.
pub(super) const SCHEMA_2: &str = "
ALTER TABLE approvals ADD COLUMN elicit INTEGER NOT NULL DEFAULT 0;
ALTER TABLE approvals ADD COLUMN used_ms INTEGER;
CREATE TABLE keys (name TEXT PRIMARY KEY, key BLOB NOT NULL);
CREATE INDEX approvals_agent ON approvals (agent, state);
PRAGMA user_version = 2;
";

/// The newest schema version.
pub(super) const LATEST: u32 = 2;

/// How long a process waits for another that holds the store's lock.
pub(super) const BUSY: Duration = Duration::from_secs(5);

/// Switches the store to write-ahead logging. The switch takes the store
/// whole, which SQLite does not wait for: while another process is opening
/// the store at the same moment, it is tried again, for as long as [`BUSY`].
pub(super) fn to_wal(db: &Connection) -> rusqlite::Result<()> {
    let started = std::time::Instant::now();
    loop {
        match db.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && started.elapsed() < BUSY =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            done => return done,
        }
    }
}

/// Brings the store's schema up to date, once, whichever process comes
/// first.
pub(super) fn migrate(db: &mut Connection) -> Result<()> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SCHEMA)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > i64::from(LATEST) {
        bail!(
            "its schema version {version} is newer than this Portcullis knows ({LATEST}): \
             a newer Portcullis migrated it"
        );
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_1)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_2)?;
    }
    tx.commit()?;
    Ok(())
}

/// Approval `id` exactly, with its votes.
pub(super) fn fetch(db: &Connection, id: &str) -> Result<Option<Approval>> {
    let found = db
        .query_row(
            &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
            [id],
            read,
        )
        .optional()?;
    found.transpose()?.map(|a| with_votes(db, a)).transpose()
}

/// `approval` with its votes, in the order given.
pub(super) fn with_votes(db: &Connection, mut approval: Approval) -> Result<Approval> {
    let mut query = db.prepare(
        "SELECT approver, decided_ms, comment FROM votes WHERE approval = ?1 \
         ORDER BY decided_ms, approver",
    )?;
    approval.votes = query
        .query_map([&approval.id], |r| {
            Ok(Vote {
                approver: r.get(0)?,
                decided_ms: r.get::<_, i64>(1)? as u64,
                comment: r.get(2)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(approval)
}

/// Makes the store private to its owner.
pub(super) fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to its owner", path.display()))
}

pub(super) fn read(row: &rusqlite::Row) -> rusqlite::Result<Result<Approval>> {
    let raw = Row {
        id: row.get(0)?,
        created_ms: row.get(1)?,
        expires_ms: row.get(2)?,
        agent: row.get(3)?,
        server: row.get(4)?,
        method: row.get(5)?,
        tool: row.get(6)?,
        arguments_sha256: row.get(7)?,
        arguments: row.get(8)?,
        policy: row.get(9)?,
        reason: row.get(10)?,
        tags: row.get(11)?,
        state: row.get(12)?,
        decided_by: row.get(13)?,
        decided_ms: row.get(14)?,
        comment: row.get(15)?,
        holder: row.get(16)?,
        approvers: row.get(17)?,
        required: row.get(18)?,
        reuse_ms: row.get(19)?,
        elicit: row.get(20)?,
        used_ms: row.get(21)?,
    };
    Ok(raw.parse())
}

/// The schema version of the store at `path`, read without changing it;
/// `None` when there is no store there yet.
pub(super) fn version(path: &Path) -> Result<Option<u32>> {
    if !path.exists() {
        return Ok(None);
    }
    let db = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open the approvals store {}", path.display()))?;
    let version: u32 = db
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .with_context(|| format!("{} is not an approvals store", path.display()))?;
    Ok(Some(version))
}

/// The store in an SQLite file.
pub(super) struct Sqlite {
    db: Mutex<Connection>,
}

impl Sqlite {
    /// Opens (creating if need be) the store at `path`, readable and
    /// writable by this user only: whoever can write it can approve.
    pub(super) fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut db = Connection::open(path)
            .with_context(|| format!("cannot open the approvals store {}", path.display()))?;
        restrict(path)?;
        db.busy_timeout(BUSY)?;
        to_wal(&db).context("cannot switch the approvals store to WAL")?;
        migrate(&mut db)
            .with_context(|| format!("{} is not an approvals store", path.display()))?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Backend for Sqlite {
    fn insert(&self, request: &Request, now: u64) -> Result<Approval> {
        let expires = now + request.expires_in.as_millis() as u64;
        let (call, terms) = (&request.call, &request.terms);
        let (tags, approvers) = encoded(request)?;
        let mut db = self.db();
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        if request.max_pending > 0 {
            let pending: i64 = tx.query_row(
                "SELECT COUNT(*) FROM approvals WHERE agent = ?1 AND state = 'pending' \
                 AND expires_ms > ?2",
                params![call.agent, now as i64],
                |r| r.get(0),
            )?;
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
                "INSERT INTO approvals ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                 ?10, ?11, ?12, 'pending', NULL, NULL, NULL, ?13, ?14, ?15, ?16, ?17, NULL)"
            ),
            params![
                request.id,
                now as i64,
                expires as i64,
                call.agent,
                call.server,
                call.method,
                call.tool,
                call.arguments_sha256,
                call.arguments,
                call.policy,
                call.reason,
                tags,
                request.holder,
                approvers,
                terms.required,
                terms.reuse_ms as i64,
                request.elicit
            ],
        )
        .context("cannot record the approval")?;
        let recorded =
            fetch(&tx, &request.id)?.context("the approval vanished as it was recorded")?;
        tx.commit()?;
        Ok(recorded)
    }

    fn fetch(&self, id: &str) -> Result<Option<Approval>> {
        fetch(&self.db(), id)
    }

    fn ids_starting(&self, prefix: &str) -> Result<Vec<String>> {
        let db = self.db();
        let mut query =
            db.prepare("SELECT id FROM approvals WHERE substr(id, 1, length(?1)) = ?1 LIMIT 2")?;
        let found = query
            .query_map([prefix], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(found)
    }

    fn ended_among(&self, ids: &[String]) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
             AND id IN (SELECT value FROM json_each(?1))"
        ))?;
        let rows = query.query_map([serde_json::to_string(ids)?], read)?;
        collect(&db, rows)
    }

    fn consume(&self, id: &str, now: u64) -> Result<bool> {
        let used = self.db().execute(
            "UPDATE approvals SET used_ms = ?2 WHERE id = ?1 AND state = 'approved' \
             AND used_ms IS NULL",
            params![id, now as i64],
        )?;
        Ok(used == 1)
    }

    fn expire_overdue(&self, now: u64) -> Result<usize> {
        let expired = self.db().execute(
            "UPDATE approvals SET state = 'expired', decided_by = 'portcullis', \
             decided_ms = expires_ms, comment = ?2 WHERE state = 'pending' AND expires_ms <= ?1",
            params![now as i64, super::EXPIRED],
        )?;
        Ok(expired)
    }

    fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE ?1 IS NULL OR state = ?1 \
             ORDER BY created_ms DESC, id DESC LIMIT ?2"
        ))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = query.query_map(params![state.map(State::as_str), limit], read)?;
        collect(&db, rows)
    }

    fn recent(&self, limit: usize) -> Result<Vec<Approval>> {
        let db = self.db();
        let mut query = db.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE state != 'pending' \
             ORDER BY decided_ms DESC, id DESC LIMIT ?1"
        ))?;
        let rows = query.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], read)?;
        collect(&db, rows)
    }

    fn reusable(&self, call: &Call, now: u64) -> Result<Option<Approval>> {
        let db = self.db();
        let id: Option<String> = db
            .query_row(
                "SELECT id FROM approvals WHERE state = 'approved' AND agent = ?1 \
                 AND server = ?2 AND method = ?3 AND tool IS ?4 AND arguments_sha256 = ?5 \
                 AND reuse_ms > 0 AND decided_ms + reuse_ms > ?6 \
                 ORDER BY decided_ms DESC LIMIT 1",
                params![
                    call.agent,
                    call.server,
                    call.method,
                    call.tool,
                    call.arguments_sha256,
                    now as i64
                ],
                |r| r.get(0),
            )
            .optional()?;
        id.map_or(Ok(None), |id| fetch(&db, &id))
    }

    fn decide(&self, id: &str, rule: Rule) -> Result<Approval, Refused> {
        let mut db = self.db();
        let tx = db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(anyhow::Error::from)?;
        let current = fetch(&tx, id)?.ok_or_else(|| Refused::Unknown(id.to_string()))?;
        match rule(&current)? {
            Ruling::End(ending) => end(&tx, id, &ending)?,
            Ruling::Vote { vote, then } => {
                tx.execute(
                    "INSERT INTO votes (approval, approver, decided_ms, comment) \
                     VALUES (?1, ?2, ?3, ?4)",
                    params![id, vote.approver, vote.decided_ms as i64, vote.comment],
                )
                .map_err(anyhow::Error::from)?;
                if let Some(ending) = then {
                    end(&tx, id, &ending)?;
                }
            }
        }
        let decided = fetch(&tx, id)?.context("the approval vanished as it was decided")?;
        tx.commit().map_err(anyhow::Error::from)?;
        Ok(decided)
    }

    fn end(&self, id: &str, ending: &Ending) -> Result<()> {
        end(&self.db(), id, ending)
    }

    fn receipt_key(&self) -> Result<[u8; 32]> {
        let db = self.db();
        let fresh: [u8; 32] = rand::random();
        db.execute(
            "INSERT OR IGNORE INTO keys (name, key) VALUES ('receipts', ?1)",
            [&fresh[..]],
        )?;
        let key: Vec<u8> =
            db.query_row("SELECT key FROM keys WHERE name = 'receipts'", [], |r| {
                r.get(0)
            })?;
        key.try_into()
            .map_err(|_| anyhow::anyhow!("the receipt key is not 32 bytes"))
    }

    fn watch(&self, _hook: Hook) -> Result<bool> {
        Ok(false)
    }
}

/// The approvals `rows` hold, each with its votes.
fn collect(
    db: &Connection,
    rows: impl Iterator<Item = rusqlite::Result<Result<Approval>>>,
) -> Result<Vec<Approval>> {
    let approvals: Vec<Approval> = rows.map(|r| r?).collect::<Result<_>>()?;
    approvals.into_iter().map(|a| with_votes(db, a)).collect()
}

/// Ends pending approval `id` as `ending` says.
fn end(db: &Connection, id: &str, ending: &Ending) -> Result<()> {
    db.execute(
        "UPDATE approvals SET state = ?2, decided_by = ?3, decided_ms = ?4, comment = ?5 \
         WHERE id = ?1 AND state = 'pending'",
        params![
            id,
            ending.state.as_str(),
            ending.by,
            ending.at as i64,
            ending.comment
        ],
    )?;
    Ok(())
}
