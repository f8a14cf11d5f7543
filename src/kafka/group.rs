//! Who owns what in a consumer group, as the group coordinator tells it.
//!
//! librdkafka has no pluggable assignor, so an instance that wants to know
//! where the partitions went (standby replicas do) asks the coordinator to
//! describe the group, and reads each member's assignment out of the
//! consumer protocol's bytes: version, then per topic its name and
//! partitions, then user data. Every version of that schema starts alike.

use rdkafka::consumer::Consumer;

use super::KafkaError;

/// One member of a consumer group and the partitions of one topic it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberAssignment {
    /// The member's `client.id`.
    pub client_id: String,
    pub partitions: Vec<i32>,
}

/// A consumer group as its coordinator describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupAssignment {
    /// `Stable` when no rebalance is under way.
    pub state: String,
    pub members: Vec<MemberAssignment>,
}

impl GroupAssignment {
    pub fn stable(&self) -> bool {
        self.state == "Stable"
    }
}

/// The members of `group` and what each owns of `topic`. A group in the
/// middle of a rebalance shows its members with what they held last, or
/// nothing; an unknown group shows no member.
pub fn group_assignment<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    client: &C,
    group: &str,
    topic: &str,
    timeout: std::time::Duration,
) -> Result<GroupAssignment, KafkaError> {
    let list = client.fetch_group_list(Some(group), timeout)?;
    let Some(info) = list.groups().iter().find(|g| g.name() == group) else { return Ok(GroupAssignment::default()) };
    let members = info
        .members()
        .iter()
        .map(|member| {
            let partitions = match member.assignment() {
                Some(bytes) if !bytes.is_empty() => {
                    assigned_partitions(bytes, topic).ok_or_else(|| KafkaError::Topic {
                        topic: topic.to_owned(),
                        reason: format!("group {group}: an assignment does not parse"),
                    })?
                }
                _ => Vec::new(),
            };
            Ok(MemberAssignment { client_id: member.client_id().to_owned(), partitions })
        })
        .collect::<Result<_, KafkaError>>()?;
    Ok(GroupAssignment { state: info.state().to_owned(), members })
}

/// The partitions of `topic` in a consumer protocol assignment; `None`
/// when the bytes are cut short.
fn assigned_partitions(bytes: &[u8], topic: &str) -> Option<Vec<i32>> {
    let mut reader = Reader(bytes);
    reader.i16()?;
    let mut partitions = Vec::new();
    for _ in 0..reader.count()? {
        let length = usize::try_from(reader.i16()?).ok()?;
        let wanted = reader.take(length)? == topic.as_bytes();
        for _ in 0..reader.count()? {
            let partition = reader.i32()?;
            if wanted {
                partitions.push(partition);
            }
        }
    }
    partitions.sort_unstable();
    Some(partitions)
}

/// Big-endian reads off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Option<i32> {
        self.take(4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An array's length; a null array (-1) counts as empty.
    fn count(&mut self) -> Option<usize> {
        Some(usize::try_from(self.i32()?).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(topics: &[(&str, &[i32])]) -> Vec<u8> {
        let mut bytes = 1i16.to_be_bytes().to_vec();
        bytes.extend((topics.len() as i32).to_be_bytes());
        for (name, partitions) in topics {
            bytes.extend((name.len() as i16).to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend((partitions.len() as i32).to_be_bytes());
            for p in *partitions {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes());
        bytes
    }

    #[test]
    fn an_assignment_gives_the_partitions_of_the_asked_topic_only() {
        let bytes = assignment(&[("other", &[0, 1]), ("in", &[5, 2]), ("in2", &[7])]);
        assert_eq!(assigned_partitions(&bytes, "in"), Some(vec![2, 5]));
        assert_eq!(assigned_partitions(&bytes, "absent"), Some(vec![]));
    }

    #[test]
    fn a_cut_assignment_is_none_not_a_panic() {
        let bytes = assignment(&[("in", &[5, 2])]);
        for cut in 0..bytes.len() - 4 {
            assert_eq!(assigned_partitions(&bytes[..cut], "in"), None, "cut at {cut}");
        }
    }
}
