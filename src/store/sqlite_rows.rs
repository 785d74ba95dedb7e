//! SQLite's usage writer at SQLite's C interface: the same batched `INSERT OR ROLLBACK`
//! statements as before, prepared once per batch size, with each text bound in place
//! (`SQLITE_STATIC`) instead of copied. Through rusqlite every text is copied into
//! SQLite's memory, freed again when the bindings are cleared, and each value passes
//! through a `ToSql` conversion: about 6,000 instructions a row of 22 values.
//!
//! The only unsafe code of the store. What it relies on:
//! - a statement is used by one thread at a time: [`RowWriter`] is only reached through
//!   the usage queue's mutex, and its connection is opened without SQLite's own mutex;
//! - a text bound in place lives, unchanged, until the statement has run: the rows are
//!   borrowed for the whole of [`RowWriter::write`], and the day texts are all made
//!   before the first binding;
//! - every parameter is bound again before each run (a statement has exactly the
//!   parameters of its rows), so no binding outlives what it points at into a later run;
//! - statements are finalised before their connection closes (field order).

#![allow(unsafe_code)]

use super::usage::{rollback_statement, sat, UsageRow, BATCH, FIELDS};
use rusqlite::ffi;
use std::ffi::c_int;
use std::ptr::NonNull;
use std::time::Duration;

/// A connection of the usage writer's own, with its prepared INSERTs.
pub struct RowWriter {
    /// By number of rows, less one. Dropped before the connection.
    inserts: Vec<Option<Insert>>,
    conn: rusqlite::Connection,
}

/// A prepared statement, finalised on drop.
struct Insert(NonNull<ffi::sqlite3_stmt>);

// SAFETY: the statement is used by one thread at a time (see the module's notes), which
// is all SQLite asks of a connection opened without its mutex.
unsafe impl Send for Insert {}

impl Drop for Insert {
    fn drop(&mut self) {
        // SAFETY: the statement was prepared on a connection that is still open, and is
        // finalised once.
        unsafe { ffi::sqlite3_finalize(self.0.as_ptr()) };
    }
}

impl RowWriter {
    /// Opens the SQLite `file` for writing usage rows.
    pub fn open(file: &std::path::Path) -> Result<RowWriter, rusqlite::Error> {
        let conn = rusqlite::Connection::open_with_flags(
            file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        // Other store work writes through sqlx's connection: wait for it, not fail.
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(RowWriter {
            inserts: (0..BATCH).map(|_| None).collect(),
            conn,
        })
    }

    /// Writes `rows` in one transaction.
    pub fn write(&mut self, rows: &[UsageRow]) -> Result<(), rusqlite::Error> {
        let tx = self.conn.unchecked_transaction()?;
        // Rows of a flush are nearly all of one day: each day's text is made once, before
        // anything is bound to it.
        let mut days: Vec<(i64, String)> = Vec::with_capacity(2);
        for r in rows {
            let day = r.ts.div_euclid(crate::clock::DAY_MS);
            if !days.iter().any(|(d, _)| *d == day) {
                let mut text = String::with_capacity(10);
                crate::clock::push_day(&mut text, r.ts);
                days.push((day, text));
            }
        }
        for chunk in rows.chunks(BATCH) {
            let insert = prepared(&self.conn, &mut self.inserts[chunk.len() - 1], chunk.len())?;
            let mut bind = Binder {
                stmt: insert.0.as_ptr(),
                conn: &self.conn,
                at: 0,
            };
            for r in chunk {
                let day = r.ts.div_euclid(crate::clock::DAY_MS);
                let day = days.iter().find(|(d, _)| *d == day).map_or("", |(_, t)| t);
                bind.text(&r.request_id)?;
                bind.int(r.ts)?;
                bind.text(day)?;
                bind.text(&r.key_id)?;
                bind.text(&r.key_name)?;
                bind.optional(r.team_id.as_deref())?;
                bind.text(&r.model)?;
                bind.optional(r.upstream.as_deref())?;
                bind.optional(r.upstream_model.as_deref())?;
                bind.int(i64::from(r.status))?;
                bind.int(i64::from(r.stream))?;
                bind.int(sat(r.input_tokens))?;
                bind.int(sat(r.output_tokens))?;
                bind.int(sat(r.cached_tokens))?;
                bind.int(r.cost_micro)?;
                bind.int(i64::from(r.priced))?;
                bind.optional(r.cache)?;
                bind.int(sat(r.saved_tokens))?;
                bind.int(r.saved_micro)?;
                bind.optional(r.translation)?;
                bind.int(sat(r.cache_write_tokens))?;
                bind.int(sat(r.reasoning_tokens))?;
            }
            bind.run(chunk.len() * FIELDS)?;
        }
        tx.commit()
    }
}

/// The INSERT of `rows` rows kept in `slot`, prepared on first use.
fn prepared<'a>(
    conn: &rusqlite::Connection,
    slot: &'a mut Option<Insert>,
    rows: usize,
) -> Result<&'a Insert, rusqlite::Error> {
    if slot.is_none() {
        let sql = rollback_statement(rows);
        let mut stmt = std::ptr::null_mut();
        // SAFETY: the handle is the open connection's; the text and its length are a
        // live &str's; SQLite writes the new statement (or null) to `stmt`.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                conn.handle(),
                sql.as_ptr().cast(),
                c_int::try_from(sql.len()).unwrap_or(c_int::MAX),
                ffi::SQLITE_PREPARE_PERSISTENT as _,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        check(conn, rc)?;
        let stmt =
            NonNull::new(stmt).ok_or_else(|| failure(ffi::SQLITE_MISUSE, "empty statement"))?;
        *slot = Some(Insert(stmt));
    }
    slot.as_ref()
        .ok_or_else(|| failure(ffi::SQLITE_MISUSE, "statement not prepared"))
}

/// Binds a statement's parameters in order, then runs it.
struct Binder<'c> {
    stmt: *mut ffi::sqlite3_stmt,
    conn: &'c rusqlite::Connection,
    at: c_int,
}

impl Binder<'_> {
    fn text(&mut self, text: &str) -> Result<(), rusqlite::Error> {
        self.at += 1;
        let len = c_int::try_from(text.len())
            .map_err(|_| failure(ffi::SQLITE_TOOBIG, "text too long"))?;
        // SAFETY: the text outlives the statement's run (see the module's notes);
        // SQLITE_STATIC tells SQLite not to copy or free it.
        let rc = unsafe {
            ffi::sqlite3_bind_text(
                self.stmt,
                self.at,
                text.as_ptr().cast(),
                len,
                ffi::SQLITE_STATIC(),
            )
        };
        check(self.conn, rc)
    }

    fn optional(&mut self, text: Option<&str>) -> Result<(), rusqlite::Error> {
        match text {
            Some(text) => self.text(text),
            None => {
                self.at += 1;
                // SAFETY: a live statement and one of its parameters.
                let rc = unsafe { ffi::sqlite3_bind_null(self.stmt, self.at) };
                check(self.conn, rc)
            }
        }
    }

    fn int(&mut self, value: i64) -> Result<(), rusqlite::Error> {
        self.at += 1;
        // SAFETY: a live statement and one of its parameters.
        let rc = unsafe { ffi::sqlite3_bind_int64(self.stmt, self.at, value) };
        check(self.conn, rc)
    }

    /// Runs the statement once every one of its `expected` parameters is bound, and makes
    /// it ready for the next run.
    fn run(self, expected: usize) -> Result<(), rusqlite::Error> {
        if usize::try_from(self.at).ok() != Some(expected) {
            return Err(failure(ffi::SQLITE_MISUSE, "not every parameter was bound"));
        }
        // SAFETY: a live statement whose parameters are all bound to live values.
        let stepped = unsafe { ffi::sqlite3_step(self.stmt) };
        // SAFETY: as above; resetting keeps the bindings, which the next run replaces.
        let reset = unsafe { ffi::sqlite3_reset(self.stmt) };
        if stepped != ffi::SQLITE_DONE {
            return check(
                self.conn,
                if reset != ffi::SQLITE_OK {
                    reset
                } else {
                    stepped
                },
            );
        }
        Ok(())
    }
}

/// Turns SQLite's result code into an error with its message.
#[inline]
fn check(conn: &rusqlite::Connection, rc: c_int) -> Result<(), rusqlite::Error> {
    if rc == ffi::SQLITE_OK || rc == ffi::SQLITE_DONE {
        return Ok(());
    }
    Err(error(conn, rc))
}

#[cold]
fn error(conn: &rusqlite::Connection, rc: c_int) -> rusqlite::Error {
    // SAFETY: the connection is open; SQLite's message stays valid until its next call,
    // and is copied here at once.
    let message = unsafe {
        let text = ffi::sqlite3_errmsg(conn.handle());
        (!text.is_null()).then(|| {
            std::ffi::CStr::from_ptr(text)
                .to_string_lossy()
                .into_owned()
        })
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), message)
}

fn failure(rc: c_int, message: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), Some(message.to_string()))
}
