//! Fuzz target over every message of the gRPC protocol (`proto/proto/trainer.proto`): decoded with
//! prost, then converted to its domain type as the receiving side does (`proto/src/convert.rs`).
//! Compiled into the fuzz crate and, through a `#[path]` module, into
//! `proto/tests/fuzz_corpora.rs`.

use std::fmt::Debug;

use prost::Message;
use proto::messages::{
    Attach, Liveness, NodeResult, NodeWork, Registered, Registration, RunSpec, ShardChunk,
    ShardPixels, Submission, Task, TaskReply, TensorRef, Verdict,
};
use proto::pb;

/// A message with a domain type. Checks, for any bytes: decoding never panics; prost re-encodes
/// what it decoded to a message that decodes the same; the conversion never panics; and a
/// converted value goes back to the wire and converts again to the same value (compared as
/// encoded bytes, so NaN payloads compare too).
fn convert<P, D>(bytes: &[u8], inspect: fn(&D))
where
    P: Message + Default + From<D>,
    D: TryFrom<P>,
    <D as TryFrom<P>>::Error: Debug,
{
    let Some(wire) = decode::<P>(bytes) else {
        return;
    };
    let Ok(domain) = D::try_from(wire) else {
        return;
    };
    inspect(&domain);
    let first = P::from(domain).encode_to_vec();
    let again = P::decode(first.as_slice()).expect("prost decodes what it encoded");
    let back = D::try_from(again).expect("a converted message converts again");
    assert_eq!(P::from(back).encode_to_vec(), first);
}

/// A message without a domain type (read field by field where it is used): decoding never
/// panics, and re-encoding gives a message that decodes the same.
fn decode<P: Message + Default>(bytes: &[u8]) -> Option<P> {
    let wire = P::decode(bytes).ok()?;
    let encoded = wire.encode_to_vec();
    let again = P::decode(encoded.as_slice()).expect("prost decodes what it encoded");
    assert_eq!(again.encode_to_vec(), encoded);
    Some(wire)
}

fn nothing<D>(_: &D) {}

/// Inline tensors decode to f32 values (their length was checked).
fn tensor(t: &TensorRef) {
    if let TensorRef::Inline(bytes) = t {
        assert!(proto::tensor::decode_f32(bytes).is_some());
    }
}

fn task(t: &Task) {
    tensor(&t.params);
    for node in &t.nodes {
        assert!(node.node.lo < node.node.hi);
        assert!(
            node.shards
                .iter()
                .map(|s| s.shard)
                .eq(node.node.lo..node.node.hi)
        );
    }
}

/// `proto_messages`: the first byte chooses the message type, the rest is its encoding.
pub fn proto_messages(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 24 {
        0 => convert::<pb::RegisterRequest, Registration>(bytes, nothing),
        1 => convert::<pb::ModelConfig, common::model::ModelConfig>(bytes, |m| {
            m.validate()
                .expect("a converted model configuration is valid");
        }),
        2 => convert::<pb::RunConfig, RunSpec>(bytes, |r| {
            assert!(r.samples > 0 && r.shards > 0);
        }),
        3 => convert::<pb::RegisterReply, Registered>(bytes, nothing),
        4 => convert::<pb::AttachRequest, Attach>(bytes, nothing),
        5 => convert::<pb::ShardChunk, ShardChunk>(bytes, |c| {
            if let ShardPixels::Inline(values) = &c.pixels {
                assert_eq!(
                    values.len() as u64,
                    u64::from(c.examples) * u64::from(c.dim)
                );
            }
        }),
        6 => convert::<pb::TensorRef, TensorRef>(bytes, tensor),
        7 => convert::<pb::NodeWork, NodeWork>(bytes, nothing),
        8 => convert::<pb::Task, Task>(bytes, task),
        9 => convert::<pb::NextTaskReply, TaskReply>(bytes, |r| {
            if let TaskReply::Task(t) = r {
                task(t);
            }
        }),
        10 => convert::<pb::NodeResult, NodeResult>(bytes, |r| {
            tensor(&r.grad);
            assert!(r.stats.elbo.is_finite() && r.stats.recon.is_finite());
            assert!(r.stats.kl.is_finite());
        }),
        11 => convert::<pb::SubmitRequest, Submission>(bytes, |s| {
            assert!(s.compute_seconds.is_finite() && s.compute_seconds >= 0.0);
        }),
        12 => convert::<pb::SubmitReply, Verdict>(bytes, nothing),
        13 => convert::<pb::HeartbeatReply, Liveness>(bytes, nothing),
        14 => drop(decode::<pb::Capabilities>(bytes)),
        15 => drop(decode::<pb::SharedMemoryOffer>(bytes)),
        16 => drop(decode::<pb::AttachReply>(bytes)),
        17 => drop(decode::<pb::FetchShardRequest>(bytes)),
        18 => drop(decode::<pb::NextTaskRequest>(bytes)),
        19 => drop(decode::<pb::Wait>(bytes)),
        20 => drop(decode::<pb::Done>(bytes)),
        21 => drop(decode::<pb::ShardWork>(bytes)),
        22 => drop(decode::<pb::SharedRegion>(bytes)),
        _ => drop(decode::<pb::HeartbeatRequest>(bytes)),
    }
}
