//! Conversions between the CRD types of `crate::api` and the allocator's own views, kept in one
//! place so the sans-IO code never sees Kubernetes types and the wire format stays Calico's.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

pub fn time_to_chrono(t: &Time) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(
        t.0.as_second(),
        u32::try_from(t.0.subsec_nanosecond()).ok()?,
    )
}

pub fn chrono_to_time(t: DateTime<Utc>) -> Option<Time> {
    let ts = Timestamp::new(
        t.timestamp(),
        i32::try_from(t.timestamp_subsec_nanos()).ok()?,
    )
    .ok()?;
    Some(Time(ts))
}

use super::IpamError;
use super::attrs::Attrs;
use super::block::{Attribute, Block};
use crate::api::ipamblock::{AllocationAttribute, IPAMBlockSpec};

/// Reads an IPAMBlock spec into the allocator's view, refusing anything inconsistent.
pub fn block_from_spec(spec: &IPAMBlockSpec) -> Result<Block, IpamError> {
    let cidr = spec.cidr_net().map_err(|e| IpamError::InvalidBlockObject {
        cidr: spec.cidr.clone(),
        reason: e.to_string(),
    })?;
    let corrupt = |reason: String| IpamError::CorruptBlock {
        block: cidr,
        reason,
    };
    let allocations = spec
        .allocations
        .iter()
        .map(|a| match a {
            None => Ok(None),
            Some(i) => usize::try_from(*i)
                .map(Some)
                .map_err(|_| corrupt(format!("negative attribute index {i}"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let unallocated = spec
        .unallocated
        .iter()
        .map(|o| usize::try_from(*o).map_err(|_| corrupt(format!("negative ordinal {o}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let attributes = spec
        .attributes
        .iter()
        .map(|a| Attribute {
            handle_id: a.handle_id.clone(),
            secondary: a.secondary.clone().map(Attrs::from).unwrap_or_default(),
            alternate: a.alternate.clone().unwrap_or_default(),
            released_at: a.released_at.as_ref().and_then(time_to_chrono),
        })
        .collect();
    let sequence_number_for_allocation = spec
        .sequence_number_for_allocation
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), *v as u64))
        .collect();
    let block = Block {
        cidr,
        affinity: spec.affinity.clone(),
        affinity_claim_time: spec.affinity_claim_time.as_ref().and_then(time_to_chrono),
        allocations,
        unallocated,
        attributes,
        sequence_number: spec.sequence_number,
        sequence_number_for_allocation,
        deleted: spec.deleted,
    };
    block.validate()?;
    Ok(block)
}

/// Writes the allocator's view back in Calico's stored form.
pub fn block_to_spec(b: &Block) -> IPAMBlockSpec {
    IPAMBlockSpec {
        cidr: b.cidr.to_string(),
        affinity: b.affinity.clone(),
        affinity_claim_time: b.affinity_claim_time.and_then(chrono_to_time),
        allocations: b.allocations.iter().map(|a| a.map(|i| i as i64)).collect(),
        unallocated: b.unallocated.iter().map(|o| *o as i64).collect(),
        attributes: b
            .attributes
            .iter()
            .map(|a| AllocationAttribute {
                handle_id: a.handle_id.clone(),
                secondary: (!a.secondary.is_empty() || a.handle_id.is_some())
                    .then(|| a.secondary.to_map()),
                alternate: (!a.alternate.is_empty()).then(|| a.alternate.clone()),
                released_at: a.released_at.and_then(chrono_to_time),
            })
            .collect(),
        sequence_number: b.sequence_number,
        sequence_number_for_allocation: Some(
            b.sequence_number_for_allocation
                .iter()
                .map(|(k, v)| (k.clone(), *v as i64))
                .collect(),
        ),
        deleted: b.deleted,
        strict_affinity: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::block::{Owner, host_affinity};
    use crate::ipam::reservations::Reservations;

    #[test]
    fn block_round_trips_through_the_crd_form() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut b = Block::new(
            "10.0.0.0/29".parse().unwrap(),
            Some(host_affinity("n1")),
            Some(t0),
            42,
        )
        .unwrap();
        let owner = Owner {
            handle_id: "k8s-pod-network.c1".into(),
            attrs: [("pod".into(), "p".into())].into(),
        };
        let cool = chrono::TimeDelta::seconds(30);
        b.auto_assign(3, &owner, &Reservations::EMPTY, t0, cool);
        b.release_by_handle("k8s-pod-network.c1", t0, cool);
        b.auto_assign(1, &owner, &Reservations::EMPTY, t0, cool);
        b.attributes[1].alternate = [("pod".into(), "q".into())].into();
        let spec = block_to_spec(&b);
        let json = serde_json::to_value(&spec).unwrap();
        // Calico's cooldown entry: an attribute with only `releasedAt`, a metav1.Time.
        assert_eq!(
            json["attributes"][0],
            serde_json::json!({"releasedAt": "2027-01-15T08:00:00Z"})
        );
        assert_eq!(json["attributes"][1]["alternateOwnerAttrs"]["pod"], "q");
        let back = block_from_spec(&serde_json::from_value(json).unwrap()).unwrap();
        assert_eq!(back, b);
    }

    #[test]
    fn inconsistent_block_objects_are_refused() {
        let b = Block::new("10.0.0.0/30".parse().unwrap(), None, None, 1).unwrap();
        let mut spec = block_to_spec(&b);
        spec.allocations[0] = Some(0);
        assert!(
            block_from_spec(&spec).is_err(),
            "ordinal 0 is allocated and unallocated"
        );
        let mut spec = block_to_spec(&b);
        spec.unallocated.push(-1);
        assert!(block_from_spec(&spec).is_err());
    }
}
