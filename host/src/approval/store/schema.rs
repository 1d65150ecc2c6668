//! The approvals store's SQLite schema, its versioned migrations, the
//! switch to write-ahead logging, and reading rows back as approvals.

use super::*;

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

pub(super) fn read(row: &Row) -> rusqlite::Result<Result<Approval>> {
    let text = |i: usize| row.get::<_, String>(i);
    let tags: String = text(11)?;
    let state: String = text(12)?;
    let approvers: Option<String> = row.get(17)?;
    let terms = (row.get::<_, i64>(18)?, row.get::<_, i64>(19)?);
    let elicit: bool = row.get(20)?;
    let used_ms: Option<i64> = row.get(21)?;
    let approval = (|| {
        Ok(Approval {
            id: text(0)?,
            created_ms: row.get::<_, i64>(1)? as u64,
            expires_ms: row.get::<_, i64>(2)? as u64,
            call: Call {
                agent: text(3)?,
                server: text(4)?,
                method: text(5)?,
                tool: row.get(6)?,
                arguments_sha256: text(7)?,
                arguments: text(8)?,
                policy: text(9)?,
                reason: text(10)?,
                tags: serde_json::from_str(&tags).context("unreadable tags")?,
            },
            state: State::parse(&state)?,
            decided_by: row.get(13)?,
            decided_ms: row.get::<_, Option<i64>>(14)?.map(|v| v as u64),
            comment: row.get(15)?,
            holder: text(16)?,
            terms: Terms {
                approvers: approvers
                    .map(|a| serde_json::from_str(&a))
                    .transpose()
                    .context("unreadable approvers")?,
                required: u32::try_from(terms.0).unwrap_or(1),
                reuse_ms: terms.1 as u64,
            },
            votes: Vec::new(),
            elicit,
            used_ms: used_ms.map(|v| v as u64),
        })
    })();
    Ok(approval)
}
