//! Partition leases: how several relay instances share one outbox.
//!
//! Aggregates hash into a fixed number of partitions. An instance publishes a
//! partition's rows only while it holds that partition's session-level
//! advisory lock, on the same connection it fetches and marks rows with. If
//! the instance dies, PostgreSQL drops its session and the locks with it, and
//! the survivors pick the partitions up on their next rebalance.
//!
//! Each instance aims for `ceil(partitions / live instances)` partitions,
//! where the live instances are the sessions on this database whose
//! `application_name` is [`LEASE_APPLICATION_NAME`].

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use sqlx::PgConnection;

/// `application_name` of every relay instance's lease connection.
pub const LEASE_APPLICATION_NAME: &str = "outbox-relay";

/// First key of the two-key advisory locks ('outb'); the second is the
/// partition number.
pub const LOCK_CLASS: i32 = 0x6f75_7462;

/// The partitions this instance holds.
#[derive(Debug)]
pub struct Leases {
    partition_count: i32,
    owned: BTreeSet<i32>,
}

impl Leases {
    /// No partitions held yet.
    pub fn new(partition_count: i32) -> Self {
        Self {
            partition_count,
            owned: BTreeSet::new(),
        }
    }

    /// The partitions held, in order.
    pub fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Counts live instances and takes or gives back partitions until this
    /// instance holds its fair share (or every free partition it can get).
    pub async fn rebalance(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(LEASE_APPLICATION_NAME)
        .fetch_one(&mut *conn)
        .await?;
        let target = fair_share(self.partition_count, live);
        let before = self.owned.len();

        while self.owned.len() > target {
            let partition = *self.owned.iter().next_back().expect("owned is not empty");
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(LOCK_CLASS)
                .bind(partition)
                .execute(&mut *conn)
                .await?;
            self.owned.remove(&partition);
            tracing::debug!(partition, "released partition");
        }

        if self.owned.len() < target {
            let mut free: Vec<i32> = (0..self.partition_count)
                .filter(|p| !self.owned.contains(p))
                .collect();
            // Random order keeps instances that start together from all
            // contending for the same partitions.
            free.shuffle(&mut rand::rng());
            for partition in free {
                if self.owned.len() >= target {
                    break;
                }
                let acquired: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(LOCK_CLASS)
                    .bind(partition)
                    .fetch_one(&mut *conn)
                    .await?;
                if acquired {
                    self.owned.insert(partition);
                    tracing::debug!(partition, "acquired partition");
                }
            }
        }
        if self.owned.len() != before {
            tracing::info!(
                live,
                partitions = self.owned.len(),
                "partition share changed"
            );
        }
        metrics::gauge!(crate::metrics::PARTITIONS_OWNED).set(self.owned.len() as f64);
        Ok(())
    }

    /// Gives every partition back.
    pub async fn release_all(&mut self, conn: &mut PgConnection) -> sqlx::Result<()> {
        sqlx::query("SELECT pg_advisory_unlock_all()")
            .execute(conn)
            .await?;
        self.owned.clear();
        metrics::gauge!(crate::metrics::PARTITIONS_OWNED).set(0.0);
        Ok(())
    }

    /// Forgets the partitions without telling PostgreSQL, after the lease
    /// connection was lost (the server released them with the session).
    pub fn forget(&mut self) {
        self.owned.clear();
        metrics::gauge!(crate::metrics::PARTITIONS_OWNED).set(0.0);
    }
}

/// Partitions one of `live` instances should hold.
fn fair_share(partition_count: i32, live: i64) -> usize {
    let live = live.max(1) as usize;
    (partition_count as usize).div_ceil(live)
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn fair_shares_cover_every_partition() {
        for live in 1..=40 {
            let share = fair_share(32, live);
            assert!(
                share * live as usize >= 32,
                "{live} instances leave partitions unowned"
            );
        }
        assert_eq!(fair_share(32, 3), 11);
        assert_eq!(fair_share(32, 0), 32);
    }
}
