//! Standby replicas: an instance keeps warm copies of the partitions
//! another owns, so when that owner dies its partitions are taken over
//! with almost nothing to restore, and the copies are exact.

use std::time::Duration;

use omni::kafka::group_assignment;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::common::*;

fn client() -> BaseConsumer {
    kafka().client_config().create().unwrap()
}

/// The input partitions the members of `instance` own, from the group's description.
fn owned_by(group: &str, input: &str, instance: &str) -> Vec<i32> {
    let client = client();
    let members = group_assignment(&client, group, input, Duration::from_secs(10)).expect("describing the group");
    let prefix = format!("{group}-{instance}-");
    members.members.into_iter().filter(|m| m.client_id.starts_with(&prefix)).flat_map(|m| m.partitions).collect()
}

/// Offsets the changelog holds in `partitions`: records and transaction markers.
fn changelog_offsets(topic: &str, partitions: &[i32]) -> i64 {
    let client = client();
    partitions
        .iter()
        .map(|&p| {
            let (low, high) = client.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            high - low
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_follows_the_owner_and_takes_over_after_a_kill_9_with_next_to_nothing_to_restore() {
    let dir = tempfile::tempdir().unwrap();
    let mut topology = fresh_topology("standby", 4, &dir.path().join("a"));
    topology.instance.standby_replicas = 1;
    create_input(&topology).await;
    let events = generate(31, 6000, 200);
    let folder = folder(&["recording", "tags"]);
    let expected = model(&folder, &events);
    let producer = producer();

    let mut a_topology = topology.clone();
    let a_addr = format!("127.0.0.1:{}", pick_free_port());
    a_topology.http.listen = a_addr.clone();
    let mut b_topology = topology.clone();
    let b_addr = format!("127.0.0.1:{}", pick_free_port());
    b_topology.http.listen = b_addr.clone();
    b_topology.store.dir = dir.path().join("b");

    let a = JobProcess::spawn(&a_topology, dir.path(), "a");
    wait_ready(&a_addr, Duration::from_secs(90)).await;
    let b = JobProcess::spawn(&b_topology, dir.path(), "b");
    wait_ready(&b_addr, Duration::from_secs(90)).await;
    wait_for(Duration::from_secs(60), "both instances to own partitions", || async {
        let (a_owns, b_owns) = (
            scraped_metric(&a_addr, "omni_assigned_partitions").await?,
            scraped_metric(&b_addr, "omni_assigned_partitions").await?,
        );
        (a_owns > 0.0 && b_owns > 0.0 && a_owns + b_owns == 4.0).then_some(())
    })
    .await;
    wait_ready(&b_addr, Duration::from_secs(90)).await;

    produce(&producer, topology.input_topic(), &events[..4000]);
    let first = model(&folder, &events[..4000]);
    read_broadcast(&topology.broadcast_topic, first.total_changes);
    let a_partitions = owned_by(&topology.application_id, topology.input_topic(), "a");
    assert!(!a_partitions.is_empty(), "instance a owns partitions");
    wait_for(Duration::from_secs(60), "b's copies of a's partitions to catch up", || async {
        let following = scraped_metric(&b_addr, "omni_standby_partitions").await?;
        let lag = scraped_metric(&b_addr, "omni_standby_lag_records").await?;
        let copied = scraped_metric(&b_addr, "omni_standby_records_total").await?;
        (following == a_partitions.len() as f64 && lag == 0.0 && copied > 0.0).then_some(())
    })
    .await;
    let restored_before = scraped_metric(&b_addr, "omni_restored_records_total").await.unwrap_or(0.0);
    let changelog_held = changelog_offsets(&topology.changelog_topic(), &a_partitions);

    a.kill9();
    wait_for(Duration::from_secs(90), "b to own and restore every partition", || async {
        let owns = scraped_metric(&b_addr, "omni_assigned_partitions").await?;
        let ready = http_get(&b_addr, "/readyz").await?.0 == 200;
        (owns == 4.0 && ready).then_some(())
    })
    .await;
    let restored = scraped_metric(&b_addr, "omni_restored_records_total").await.unwrap_or(0.0) - restored_before;
    eprintln!(
        "taking over {a_partitions:?} restored {restored} records; their changelog holds {changelog_held} offsets"
    );
    assert!(
        restored * 10.0 <= changelog_held as f64,
        "the takeover restored {restored} records of the {changelog_held} its copies should already have held"
    );

    produce(&producer, topology.input_topic(), &events[4000..]);
    let changes = read_broadcast(&topology.broadcast_topic, expected.total_changes);
    assert_broadcast_exact(&changes, &expected);
    assert_redis_exact(&topology, &folder, &expected).await;
    b.terminate();
    // b's store alone holds every room: its copies of a's partitions were exact.
    assert_store_exact(&[&b_topology.store.dir], topology.partitions, &expected);
}
