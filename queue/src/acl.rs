//! Redis ACL users of pools: each pool's workers log in as a user of their own that reaches
//! only the pool's keys (`Keys::pool_pattern`) with only the commands the worker side of the
//! protocol sends, so whoever holds one pool's credentials can read, claim, finish, enqueue or
//! cancel no job of another pool and read none of its events.
//!
//! The operator (with its admin credentials) sets the users up ([`Queue::apply_pool_user`]) on
//! every reconcile of a pool (Redis without an ACL file forgets them when it restarts) and
//! deletes them with the pool ([`Queue::delete_pool_user`]).

use crate::error::{QueueError, Result};
use crate::keys::{Keys, validate_name};
use crate::queue::Queue;

/// Every command a worker sends, directly or from the protocol's scripts (Redis checks ACL
/// permissions on each `redis.call` inside a script too), and nothing else:
///
/// - connection set-up by redis-rs: `PING`, `SELECT` (a database in the URL); `AUTH`/`HELLO`
///   need none, and the `CLIENT SETINFO` it sends (Redis ≥ 7.2) may fail, which it ignores
///   (the command does not exist in 7.0, where naming it would make `ACL SETUSER` fail);
/// - scripts: `EVALSHA`, `EVAL`/`SCRIPT LOAD` (redis-rs loads a script Redis does not have yet);
/// - `worker.rs` outside scripts: `XREADGROUP` (the blocking read), `HMGET` (claim checks);
///   `serve` reads the claimed job with `HGETALL`;
/// - inside the worker's scripts (`scripts.rs`: claim, claim-delivered, release, heartbeat,
///   progress, complete, fail, cancelled, hand-back, leave, ensure-streams): `TIME`, `INFO`
///   (the server's `run_id`), `HGET`, `HGETALL`, `HMGET`, `HSET`, `HDEL`, `PEXPIRE`, `XADD`,
///   `XACK`, `XDEL`, `XRANGE`, `XPENDING`, `XAUTOCLAIM`, `XCLAIM`, `XREADGROUP`,
///   `XGROUP CREATE`, `XGROUP DELCONSUMER`.
///
/// The worker's own tests run it under a user with exactly this list.
pub const WORKER_COMMANDS: &[&str] = &[
    "ping",
    "select",
    "evalsha",
    "eval",
    "script|load",
    "time",
    "info",
    "hget",
    "hgetall",
    "hmget",
    "hset",
    "hdel",
    "pexpire",
    "xadd",
    "xack",
    "xdel",
    "xrange",
    "xpending",
    "xautoclaim",
    "xclaim",
    "xreadgroup",
    "xgroup|create",
    "xgroup|delconsumer",
];

/// The `ACL SETUSER` rules of a pool's user: everything reset, then on, exactly these
/// passwords, the pool's key pattern, no pub/sub channel and [`WORKER_COMMANDS`].
/// `passwords` are plain (`>pw`) or SHA-256 hex digests as `ACL GETUSER` lists them (`#hex`).
pub fn pool_user_rules(keys: &Keys, pool: &str, passwords: &[Password<'_>]) -> Vec<String> {
    let mut rules = vec!["reset".to_string(), "on".to_string()];
    for p in passwords {
        rules.push(match p {
            Password::Plain(p) => format!(">{p}"),
            Password::Sha256(h) => format!("#{h}"),
        });
    }
    rules.push("resetkeys".into());
    rules.push(format!("~{}", keys.pool_pattern(pool)));
    rules.push("resetchannels".into());
    rules.push("-@all".into());
    rules.extend(WORKER_COMMANDS.iter().map(|c| format!("+{c}")));
    rules
}

/// A password of a pool user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Password<'a> {
    Plain(&'a str),
    /// The SHA-256 of a password, in hex (what Redis keeps and `ACL GETUSER` shows).
    Sha256(&'a str),
}

impl Queue {
    /// Creates or replaces the ACL user of `pool` (named [`Keys::pool_user`]) with
    /// [`pool_user_rules`]. At least one password; none may be empty or hold whitespace.
    /// Returns the user name. Connections already logged in as the user keep working and get
    /// the new rules at once.
    pub async fn apply_pool_user(&self, pool: &str, passwords: &[Password<'_>]) -> Result<String> {
        validate_name("pool", pool)?;
        if passwords.is_empty() {
            return Err(QueueError::Config("a pool user needs a password".into()));
        }
        for p in passwords {
            let (Password::Plain(s) | Password::Sha256(s)) = p;
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(QueueError::Config(
                    "a pool user's password must be non-empty and free of whitespace".into(),
                ));
            }
        }
        let user = self.keys().pool_user(pool);
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg(pool_user_rules(self.keys(), pool, passwords))
            .query_async(&mut self.conn())
            .await?;
        Ok(user)
    }

    /// The SHA-256 digests (hex) of the passwords the pool's user has now; empty when there
    /// is no such user.
    pub async fn pool_user_password_hashes(&self, pool: &str) -> Result<Vec<String>> {
        validate_name("pool", pool)?;
        let v: redis::Value = redis::cmd("ACL")
            .arg("GETUSER")
            .arg(self.keys().pool_user(pool))
            .query_async(&mut self.conn())
            .await?;
        let pairs: Vec<(String, redis::Value)> = match v {
            redis::Value::Nil => return Ok(Vec::new()),
            redis::Value::Map(m) => m
                .into_iter()
                .filter_map(|(k, v)| crate::reply::opt_string(&k).map(|k| (k, v)))
                .collect(),
            redis::Value::Array(a) => {
                let mut out = Vec::new();
                let mut it = a.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let Some(k) = crate::reply::opt_string(&k) {
                        out.push((k, v));
                    }
                }
                out
            }
            other => {
                return Err(QueueError::protocol(
                    "acl getuser",
                    format!("reply {other:?}"),
                ));
            }
        };
        let passwords = pairs
            .into_iter()
            .find(|(k, _)| k == "passwords")
            .map(|(_, v)| v);
        match passwords {
            None => Ok(Vec::new()),
            Some(v) => crate::reply::strings("acl getuser passwords", v),
        }
    }

    /// Deletes the pool's user (its connections are closed by Redis). Returns whether it existed.
    pub async fn delete_pool_user(&self, pool: &str) -> Result<bool> {
        validate_name("pool", pool)?;
        let n: u64 = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(self.keys().pool_user(pool))
            .query_async(&mut self.conn())
            .await?;
        Ok(n > 0)
    }

    /// The pools that have a user under this prefix (`ACL USERS`), whether they exist or not.
    pub async fn pools_with_users(&self) -> Result<Vec<String>> {
        let users: Vec<String> = redis::cmd("ACL")
            .arg("USERS")
            .query_async(&mut self.conn())
            .await?;
        let prefix = format!("{}:", self.keys().prefix());
        let mut pools: Vec<String> = users
            .iter()
            .filter_map(|u| u.strip_prefix(&prefix))
            .filter(|p| p.contains('/') && validate_name("pool", p).is_ok())
            .map(str::to_string)
            .collect();
        pools.sort();
        Ok(pools)
    }

    /// A new random password from Redis (`ACL GENPASS`: 256 bits from the server's
    /// `/dev/urandom`, as 64 hex digits).
    pub async fn generate_password(&self) -> Result<String> {
        let p: String = redis::cmd("ACL")
            .arg("GENPASS")
            .query_async(&mut self.conn())
            .await?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_reset_everything_first() {
        let k = Keys::new("pawfect").unwrap();
        let r = pool_user_rules(
            &k,
            "media/t4",
            &[Password::Plain("new"), Password::Sha256("abc")],
        );
        assert_eq!(
            r[..8],
            [
                "reset",
                "on",
                ">new",
                "#abc",
                "resetkeys",
                "~pawfect:p:media/t4:*",
                "resetchannels",
                "-@all"
            ]
        );
        assert_eq!(r.len(), 8 + WORKER_COMMANDS.len());
        assert!(r[8..].iter().all(|c| c.starts_with('+')));
    }
}
