//! Standby replicas, as Kafka Streams' standby tasks: warm copies of
//! partitions another instance owns, so taking one over restores only the
//! records since the copy's last write instead of the whole changelog.
//!
//! One thread per instance follows, with one consumer of its own, the
//! changelog partitions this instance stands by for, and writes their
//! records to the store as a restore would, checkpoint included. It never
//! writes a partition this instance owns ([`Claims`]): when a rebalance
//! hands one over, its restore claims it first and goes on from the
//! standby's checkpoint.
//!
//! librdkafka has no pluggable assignor, so standbys cannot steer where a
//! partition goes. Instead every instance reads the group's assignment every
//! few seconds and places the copies by a rule all instances agree on
//! ([`standby_partitions`]): the first where the assignor would move the
//! partition if its owner failed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{changelog_write, position_past_markers, resume_offset, Changelog, ChangelogRecords, Claims};
use super::RuntimeError;
use crate::kafka::{group_assignment, MemberAssignment};
use crate::store::StateStore;

/// How often the group's assignment is read again.
const PLAN_EVERY: Duration = Duration::from_secs(2);

/// How long one ask to the coordinator or for watermarks may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest pause between two attempts after a failure (brokers away).
const MOST_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// Records, and bytes, gathered before they are written to the store.
const BATCH_RECORDS: usize = 10_000;
const BATCH_BYTES: usize = 16 << 20;

/// The instance a group member belongs to: its `client.id` is
/// `<application_id>-<instance id>-<thread>`, so the instance is all but the
/// last part.
pub fn member_instance(client_id: &str) -> &str {
    client_id.rsplit_once('-').map_or(client_id, |(instance, _)| instance)
}

/// The partitions `me` keeps standby copies of, given the group's
/// `members` and what each owns. Every instance computes the same placement
/// from the same description.
///
/// A partition's first copy goes to its heir: the instance it would move to
/// if its owner's instance failed, as librdkafka's cooperative-sticky
/// assignor hands out the orphans of a member that left (each in ascending
/// order to the member owning fewest partitions, ties to the lower member
/// name), so the copy is where a single failure sends the partition. Further
/// copies go to the other instances in sorted order after the owner,
/// rotated by the partition number so one owner's copies spread.
pub fn standby_partitions(members: &[MemberAssignment], me: &str, replicas: usize) -> BTreeSet<i32> {
    let mut standbys = BTreeSet::new();
    if replicas == 0 {
        return standbys;
    }
    let instances: BTreeSet<&str> = members.iter().map(|m| member_instance(&m.client_id)).chain([me]).collect();
    let instances: Vec<&str> = instances.into_iter().collect();
    for (owner, heirs) in heirs_by_owner(members) {
        let at = instances.iter().position(|i| *i == owner).unwrap_or(0);
        let others: Vec<&str> = (1..instances.len()).map(|k| instances[(at + k) % instances.len()]).collect();
        for (partition, heir) in heirs {
            let rotation = partition.unsigned_abs() as usize % others.len();
            let rest = (0..others.len()).map(|k| others[(rotation + k) % others.len()]).filter(|i| *i != heir);
            if heir == me || rest.take(replicas - 1).any(|i| i == me) {
                standbys.insert(partition);
            }
        }
    }
    standbys
}

/// For each owning instance, each of its partitions and the instance it
/// would go to if that instance failed, by the sticky assignor's rule for
/// orphaned partitions. Partitions of an instance with no other member to
/// go to are left out.
fn heirs_by_owner(members: &[MemberAssignment]) -> BTreeMap<&str, Vec<(i32, &str)>> {
    let mut by_owner: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for member in members {
        by_owner.entry(member_instance(&member.client_id)).or_default().extend(&member.partitions);
    }
    let mut heirs = BTreeMap::new();
    for (owner, mut orphans) in by_owner {
        orphans.sort_unstable();
        let mut loads: BTreeMap<&str, usize> = members
            .iter()
            .filter(|m| member_instance(&m.client_id) != owner)
            .map(|m| (m.client_id.as_str(), m.partitions.len()))
            .collect();
        let mut of_owner = Vec::new();
        for partition in orphans {
            let Some((&member, _)) = loads.iter().min_by_key(|(member, load)| (**load, **member)) else { break };
            *loads.get_mut(member).expect("a member just found") += 1;
            of_owner.push((partition, member_instance(member)));
        }
        heirs.insert(owner, of_owner);
    }
    heirs
}

/// Where the copies are, and what reads them.
pub struct Standby {
    consumer: BaseConsumer,
    group: String,
    input: String,
    changelog: String,
    /// `<application_id>-<instance id>`: this instance in [`member_instance`]'s terms.
    me: String,
    replicas: usize,
    store: Arc<dyn StateStore>,
    claims: Arc<Claims>,
    /// Partitions followed, and the next changelog offset of each.
    following: BTreeMap<i32, i64>,
    planned: Option<Instant>,
}

impl Standby {
    /// A standby for `group`'s partitions of `input`, as instance `me`.
    pub fn new(
        changelog: Changelog,
        group: String,
        input: String,
        me: String,
        replicas: usize,
    ) -> Result<Standby, RuntimeError> {
        let Changelog { settings, topic, store, claims } = changelog;
        let mut config = settings.client_config();
        config
            .set("group.id", format!("{group}-standby"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100");
        crate::kafka::bound_prefetch(&mut config, 4096);
        let consumer = config.create()?;
        Ok(Standby {
            consumer,
            group,
            input,
            changelog: topic,
            me,
            replicas,
            store,
            claims,
            following: BTreeMap::new(),
            planned: None,
        })
    }

    /// Follows the standby partitions until `stop` is set. A failure is
    /// logged and tried again: a standby is an optimisation, never a reason
    /// to stop processing.
    pub fn run(mut self, stop: &AtomicBool) {
        let gauge = metrics::gauge!("omni_standby_partitions");
        let mut pause = Duration::from_secs(1);
        while !stop.load(Ordering::Relaxed) {
            match self.run_once() {
                Ok(()) => pause = Duration::from_secs(1),
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?pause, "standby replicas: retrying from the store's checkpoints");
                    self.following.clear();
                    let _ = self.consumer.unassign();
                    self.planned = None;
                    let until = Instant::now() + pause;
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    pause = (pause * 2).min(MOST_RETRY_PAUSE);
                }
            }
            gauge.set(self.following.len() as f64);
        }
        gauge.set(0.0);
        metrics::gauge!("omni_standby_lag_records").set(0.0);
    }

    fn run_once(&mut self) -> Result<(), RuntimeError> {
        if self.planned.is_none_or(|at| at.elapsed() >= PLAN_EVERY) {
            self.planned = Some(Instant::now());
            self.plan()?;
        } else {
            // A partition this instance took over leaves at once, not at the next plan.
            let owned = self.claims.owned();
            if self.following.keys().any(|p| owned.contains(p)) {
                let keep = self.following.keys().copied().filter(|p| !owned.contains(p)).collect();
                self.follow(keep)?;
            }
        }
        self.copy_a_batch()
    }

    /// Reads the group's assignment and follows what the rule gives this
    /// instance, less what it owns. A group with no assignment to read (a
    /// rebalance under way) leaves the copies as they are.
    fn plan(&mut self) -> Result<(), RuntimeError> {
        let members = group_assignment(&self.consumer, &self.group, &self.input, ASK_TIMEOUT)?.members;
        if members.iter().all(|m| m.partitions.is_empty()) {
            return Ok(());
        }
        let owned = self.claims.owned();
        let wanted: BTreeSet<i32> =
            standby_partitions(&members, &self.me, self.replicas).into_iter().filter(|p| !owned.contains(p)).collect();
        if wanted != self.following.keys().copied().collect() {
            tracing::info!(partitions = ?wanted, "standby replicas follow");
            self.follow(wanted)?;
        }
        metrics::gauge!("omni_standby_lag_records").set(self.lag()? as f64);
        Ok(())
    }

    /// Records the copies are behind what their changelogs let a
    /// read_committed reader see (the consumer asks for the last stable
    /// offset), by the consumer's position, which moves past transaction
    /// markers as records do. One request per partition, once a plan.
    fn lag(&self) -> Result<i64, RuntimeError> {
        let positions = self.consumer.position()?;
        let mut lag = 0;
        for (&partition, &next) in &self.following {
            let position = position_past_markers(&positions, &self.changelog, partition, next);
            let (_, end) = self.consumer.fetch_watermarks(&self.changelog, partition, ASK_TIMEOUT)?;
            lag += (end - position).max(0);
        }
        Ok(lag)
    }

    /// Assigns the consumer to `partitions`, each from where its copy got to.
    fn follow(&mut self, partitions: BTreeSet<i32>) -> Result<(), RuntimeError> {
        let mut following = BTreeMap::new();
        for partition in partitions {
            let next = match self.following.get(&partition) {
                Some(&next) => next,
                None => match self.resume(partition)? {
                    Some(next) => next,
                    None => continue,
                },
            };
            following.insert(partition, next);
        }
        let mut assignment = TopicPartitionList::new();
        for (&partition, &next) in &following {
            assignment.add_partition_offset(&self.changelog, partition, Offset::Offset(next))?;
        }
        self.consumer.assign(&assignment)?;
        self.following = following;
        Ok(())
    }

    /// Where a copy resumes; `None` if this instance owns the partition now.
    fn resume(&self, partition: i32) -> Result<Option<i64>, RuntimeError> {
        let watermarks = self.consumer.fetch_watermarks(&self.changelog, partition, ASK_TIMEOUT)?;
        let mut next = None;
        // Under the claim's lock: clearing an owned partition would lose its state.
        self.claims.unless_owned(partition, || {
            next = Some(resume_offset(self.store.as_ref(), partition, watermarks)?);
            Ok(())
        })?;
        Ok(next)
    }

    /// Polls what has arrived and writes it to the copies, each partition
    /// with its checkpoint, in one store write per partition.
    fn copy_a_batch(&mut self) -> Result<(), RuntimeError> {
        if self.following.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
        let mut batches: BTreeMap<i32, ChangelogRecords> = BTreeMap::new();
        let (mut records, mut bytes) = (0, 0);
        let mut timeout = Duration::from_millis(100);
        while records < BATCH_RECORDS && bytes < BATCH_BYTES {
            let Some(polled) = self.consumer.poll(timeout) else { break };
            let message = polled?;
            timeout = Duration::ZERO;
            let partition = message.partition();
            let Some(next) = self.following.get_mut(&partition) else { continue };
            *next = message.offset() + 1;
            if let (Some(key), Some(value)) = (message.key(), message.payload()) {
                bytes += key.len() + value.len();
                records += 1;
                batches.entry(partition).or_default().push((key.to_vec(), value.to_vec()));
            }
        }
        for (partition, rooms) in batches {
            let (count, next) = (rooms.len() as u64, self.following[&partition]);
            let store = &self.store;
            if self.claims.unless_owned(partition, || store.write(partition, changelog_write(rooms, next)))? {
                metrics::counter!("omni_standby_records_total").increment(count);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One member per instance (thread 0), owning `partitions`.
    fn members(owned: &[(&str, &[i32])]) -> Vec<MemberAssignment> {
        owned
            .iter()
            .map(|(instance, partitions)| MemberAssignment {
                client_id: format!("{instance}-0"),
                partitions: partitions.to_vec(),
            })
            .collect()
    }

    fn copies(members: &[MemberAssignment], everyone: &[&str], replicas: usize) -> BTreeMap<i32, Vec<String>> {
        let mut copies = BTreeMap::<i32, Vec<String>>::new();
        for me in everyone {
            for partition in standby_partitions(members, me, replicas) {
                copies.entry(partition).or_default().push(me.to_string());
            }
        }
        copies
    }

    #[test]
    fn a_member_belongs_to_the_instance_its_client_id_names() {
        assert_eq!(member_instance("app-omni-0-1"), "app-omni-0");
        assert_eq!(member_instance("app-3f2a-0"), "app-3f2a");
    }

    #[test]
    fn the_first_copy_is_where_the_sticky_assignor_sends_a_failed_owners_partitions() {
        // As seen on a real broker: a's partitions went to c, b and c, each
        // in turn to the member owning fewest, ties to the lower name.
        let group = members(&[("a", &[0, 3, 6]), ("b", &[1, 4, 7]), ("c", &[2, 5])]);
        let placed = copies(&group, &["a", "b", "c"], 1);
        assert_eq!(placed[&0], ["c"]);
        assert_eq!(placed[&3], ["b"]);
        assert_eq!(placed[&6], ["c"]);
    }

    #[test]
    fn each_partition_gets_the_asked_copies_never_on_its_owner() {
        let group = members(&[("a", &[0, 1, 2]), ("b", &[3, 4]), ("c", &[5, 6, 7])]);
        for replicas in 0..=3 {
            let placed = copies(&group, &["a", "b", "c"], replicas);
            for partition in 0..8 {
                let holders = placed.get(&partition).cloned().unwrap_or_default();
                assert_eq!(holders.len(), replicas.min(2), "partition {partition} with {replicas} copies: {holders:?}");
                let owner = group.iter().find(|m| m.partitions.contains(&partition)).unwrap();
                assert!(!holders.contains(&member_instance(&owner.client_id).to_owned()), "{partition} on its owner");
            }
        }
    }

    #[test]
    fn instances_that_own_nothing_are_heirs_first_and_all_agree() {
        let group = members(&[("a", &[0, 1]), ("b", &[2, 3]), ("c", &[]), ("d", &[])]);
        let placed = copies(&group, &["a", "b", "c", "d"], 2);
        for partition in 0..4 {
            assert_eq!(placed[&partition].len(), 2, "partition {partition}: {:?}", placed[&partition]);
        }
        let first = copies(&group, &["a", "b", "c", "d"], 1);
        assert_eq!(first[&0], ["c"], "the idle c takes a's first orphan");
        assert_eq!(first[&1], ["d"], "then the idle d, owning fewer than c now");
    }

    #[test]
    fn a_lone_instance_keeps_no_copies() {
        let group = members(&[("a", &[0, 1, 2])]);
        assert!(standby_partitions(&group, "a", 1).is_empty());
    }
}
