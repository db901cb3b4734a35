//! Every conversion between a prost message ([`crate::pb`]) and its domain type
//! ([`crate::messages`]): `From` towards the wire (cannot fail), `TryFrom` from it (checks every
//! field a peer could get wrong and names it in the error).

use common::model::{BatchStats, Likelihood, ModelConfig};
use common::train::Node;

use crate::messages::*;
use crate::pb;
use crate::tensor;

/// A message that does not decode into its domain type: a peer of another version or a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {message}: {problem}")]
pub struct WireError {
    /// The message (and field) that was wrong.
    pub message: &'static str,
    pub problem: String,
}

fn malformed(message: &'static str, problem: impl Into<String>) -> WireError {
    WireError {
        message,
        problem: problem.into(),
    }
}

fn required<T>(field: Option<T>, message: &'static str, name: &str) -> Result<T, WireError> {
    field.ok_or_else(|| malformed(message, format!("`{name}` is missing")))
}

fn to_u32(value: usize) -> u32 {
    u32::try_from(value).expect("sizes on the wire fit in u32 (checked when the run is built)")
}

// ---- registration ----

impl From<Registration> for pb::RegisterRequest {
    fn from(r: Registration) -> Self {
        pb::RegisterRequest {
            protocol_version: r.protocol_version,
            name: r.name,
            capabilities: Some(pb::Capabilities {
                threads: r.threads,
                build: r.build,
            }),
        }
    }
}

impl TryFrom<pb::RegisterRequest> for Registration {
    type Error = WireError;
    fn try_from(r: pb::RegisterRequest) -> Result<Self, WireError> {
        // The version is read before anything else can fail, so an old peer hears "version".
        let caps = r.capabilities.unwrap_or_default();
        Ok(Registration {
            protocol_version: r.protocol_version,
            name: r.name,
            threads: caps.threads,
            build: caps.build,
        })
    }
}

impl From<ModelConfig> for pb::ModelConfig {
    fn from(m: ModelConfig) -> Self {
        let (likelihood, gaussian_variance) = match m.likelihood {
            Likelihood::Bernoulli => (pb::Likelihood::Bernoulli, 0.0),
            Likelihood::Gaussian { variance } => (pb::Likelihood::Gaussian, variance),
        };
        pb::ModelConfig {
            input_dim: to_u32(m.input_dim),
            hidden: m.hidden.into_iter().map(to_u32).collect(),
            latent: to_u32(m.latent),
            likelihood: likelihood.into(),
            gaussian_variance,
        }
    }
}

impl TryFrom<pb::ModelConfig> for ModelConfig {
    type Error = WireError;
    fn try_from(m: pb::ModelConfig) -> Result<Self, WireError> {
        const MSG: &str = "ModelConfig";
        let likelihood = match pb::Likelihood::try_from(m.likelihood) {
            Ok(pb::Likelihood::Bernoulli) => Likelihood::Bernoulli,
            Ok(pb::Likelihood::Gaussian) => Likelihood::Gaussian {
                variance: m.gaussian_variance,
            },
            _ => {
                return Err(malformed(
                    MSG,
                    format!(
                        "unknown likelihood {}: run the same release on both sides",
                        m.likelihood
                    ),
                ));
            }
        };
        let model = ModelConfig {
            input_dim: m.input_dim as usize,
            hidden: m.hidden.into_iter().map(|h| h as usize).collect(),
            latent: m.latent as usize,
            likelihood,
        };
        model
            .validate()
            .map_err(|e| malformed(MSG, e.to_string()))?;
        Ok(model)
    }
}

impl From<RunSpec> for pb::RunConfig {
    fn from(r: RunSpec) -> Self {
        pb::RunConfig {
            model: Some(r.model.into()),
            samples: to_u32(r.samples),
            seed: r.seed,
            shards: to_u32(r.shards),
            run_id: r.run_id,
        }
    }
}

impl TryFrom<pb::RunConfig> for RunSpec {
    type Error = WireError;
    fn try_from(r: pb::RunConfig) -> Result<Self, WireError> {
        const MSG: &str = "RunConfig";
        if r.samples == 0 || r.shards == 0 {
            return Err(malformed(
                MSG,
                format!(
                    "samples {} and shards {} must be positive",
                    r.samples, r.shards
                ),
            ));
        }
        Ok(RunSpec {
            model: required(r.model, MSG, "model")?.try_into()?,
            samples: r.samples as usize,
            seed: r.seed,
            shards: r.shards as usize,
            run_id: r.run_id,
        })
    }
}

impl From<Registered> for pb::RegisterReply {
    fn from(r: Registered) -> Self {
        pb::RegisterReply {
            worker_id: r.worker_id,
            worker_key: r.worker_key.as_bytes().to_vec().into(),
            config: Some(r.run.into()),
            shared_memory: r.shared_memory.map(|s| pb::SharedMemoryOffer {
                dir: s.dir.to_string_lossy().into_owned(),
                probe_file: s.probe_file,
            }),
        }
    }
}

impl TryFrom<pb::RegisterReply> for Registered {
    type Error = WireError;
    fn try_from(r: pb::RegisterReply) -> Result<Self, WireError> {
        const MSG: &str = "RegisterReply";
        let shared_memory = match r.shared_memory {
            None => None,
            Some(s) => {
                let dir = std::path::PathBuf::from(s.dir);
                let plain_name = !s.probe_file.is_empty()
                    && !s.probe_file.contains(['/', '\\'])
                    && s.probe_file != ".."
                    && s.probe_file != ".";
                if !dir.is_absolute() || !plain_name {
                    return Err(malformed(
                        MSG,
                        format!(
                            "shared-memory offer {} / {} is not an absolute directory and a \
                             plain file name",
                            dir.display(),
                            s.probe_file
                        ),
                    ));
                }
                Some(SharedMemoryOffer {
                    dir,
                    probe_file: s.probe_file,
                })
            }
        };
        let worker_key =
            crate::credentials::WorkerKey::from_bytes(&r.worker_key).ok_or_else(|| {
                malformed(
                    MSG,
                    format!("worker_key has {} bytes, not 16", r.worker_key.len()),
                )
            })?;
        Ok(Registered {
            worker_id: r.worker_id,
            worker_key,
            run: required(r.config, MSG, "config")?.try_into()?,
            shared_memory,
        })
    }
}

impl From<Attach> for pb::AttachRequest {
    fn from(a: Attach) -> Self {
        pb::AttachRequest {
            probe: a.probe.into(),
        }
    }
}

impl From<pb::AttachRequest> for Attach {
    fn from(a: pb::AttachRequest) -> Self {
        Attach {
            probe: a.probe.to_vec(),
        }
    }
}

// ---- shard data ----

impl From<ShardChunk> for pb::ShardChunk {
    fn from(c: ShardChunk) -> Self {
        let (pixels, shared) = match c.pixels {
            ShardPixels::Inline(values) => (tensor::encode_f32(&values), None),
            ShardPixels::SharedFile { offset } => (
                Default::default(),
                Some(pb::SharedRegion {
                    offset,
                    len: u64::from(c.examples) * u64::from(c.dim),
                }),
            ),
        };
        pb::ShardChunk {
            shard: c.shard,
            first_example: c.first_example,
            examples: c.examples,
            dim: c.dim,
            pixels,
            shared,
        }
    }
}

impl TryFrom<pb::ShardChunk> for ShardChunk {
    type Error = WireError;
    fn try_from(c: pb::ShardChunk) -> Result<Self, WireError> {
        let values = u64::from(c.examples) * u64::from(c.dim);
        let pixels = match c.shared {
            None => {
                // Checked: examples and dim near u32::MAX make the byte count overflow u64, and a
                // wrapped count could match a short message (found by
                // fuzz/fuzz_targets/shard_chunks.rs).
                let bytes = values.checked_mul(4);
                if bytes != Some(c.pixels.len() as u64) {
                    return Err(malformed(
                        "ShardChunk",
                        format!(
                            "shard {}: {} bytes of pixels for {} examples of {} values",
                            c.shard,
                            c.pixels.len(),
                            c.examples,
                            c.dim
                        ),
                    ));
                }
                ShardPixels::Inline(tensor::decode_f32(&c.pixels).expect("length checked above"))
            }
            Some(region) => {
                if !c.pixels.is_empty() || region.len != values || region.offset % 4 != 0 {
                    return Err(malformed(
                        "ShardChunk",
                        format!(
                            "shard {}: a shared region of {} values at byte {} (and {} inline \
                             bytes) for {} examples of {} values: it must hold exactly those \
                             values, at a multiple of 4, with nothing inline",
                            c.shard,
                            region.len,
                            region.offset,
                            c.pixels.len(),
                            c.examples,
                            c.dim
                        ),
                    ));
                }
                ShardPixels::SharedFile {
                    offset: region.offset,
                }
            }
        };
        Ok(ShardChunk {
            shard: c.shard,
            first_example: c.first_example,
            examples: c.examples,
            dim: c.dim,
            pixels,
        })
    }
}

// ---- tasks ----

impl From<TensorRef> for pb::TensorRef {
    fn from(t: TensorRef) -> Self {
        use pb::tensor_ref::Location;
        pb::TensorRef {
            location: Some(match t {
                TensorRef::Inline(bytes) => Location::Inline(bytes),
                TensorRef::Shared { offset, len } => {
                    Location::Shared(pb::SharedRegion { offset, len })
                }
                TensorRef::ParameterFile { slot, len } => {
                    Location::ParameterFile(pb::ParameterFile { slot, len })
                }
            }),
        }
    }
}

impl TryFrom<pb::TensorRef> for TensorRef {
    type Error = WireError;
    fn try_from(t: pb::TensorRef) -> Result<Self, WireError> {
        use pb::tensor_ref::Location;
        const MSG: &str = "TensorRef";
        match required(t.location, MSG, "location")? {
            Location::Inline(bytes) if bytes.len().is_multiple_of(4) => {
                Ok(TensorRef::Inline(bytes))
            }
            Location::Inline(bytes) => Err(malformed(
                MSG,
                format!("{} bytes is not a whole number of f32 values", bytes.len()),
            )),
            Location::Shared(r) => Ok(TensorRef::Shared {
                offset: r.offset,
                len: r.len,
            }),
            Location::ParameterFile(f) if f.slot < crate::shared_memory::PARAM_SLOTS => {
                Ok(TensorRef::ParameterFile {
                    slot: f.slot,
                    len: f.len,
                })
            }
            Location::ParameterFile(f) => Err(malformed(
                MSG,
                format!(
                    "parameter file {} does not exist (there are {})",
                    f.slot,
                    crate::shared_memory::PARAM_SLOTS
                ),
            )),
        }
    }
}

impl From<ShardWork> for pb::ShardWork {
    fn from(s: ShardWork) -> Self {
        pb::ShardWork {
            shard: s.shard,
            examples: s.examples,
        }
    }
}

impl From<pb::ShardWork> for ShardWork {
    fn from(s: pb::ShardWork) -> Self {
        ShardWork {
            shard: s.shard,
            examples: s.examples,
        }
    }
}

impl From<NodeWork> for pb::NodeWork {
    fn from(n: NodeWork) -> Self {
        pb::NodeWork {
            lo: n.node.lo,
            hi: n.node.hi,
            shards: n.shards.into_iter().map(Into::into).collect(),
        }
    }
}

fn node(lo: u32, hi: u32, message: &'static str) -> Result<Node, WireError> {
    if lo >= hi {
        return Err(malformed(message, format!("empty shard range {lo}..{hi}")));
    }
    Ok(Node { lo, hi })
}

impl TryFrom<pb::NodeWork> for NodeWork {
    type Error = WireError;
    fn try_from(n: pb::NodeWork) -> Result<Self, WireError> {
        const MSG: &str = "NodeWork";
        let node = node(n.lo, n.hi, MSG)?;
        let listed = n.shards.iter().map(|s| s.shard);
        if !listed.eq(node.lo..node.hi) {
            return Err(malformed(
                MSG,
                format!(
                    "node {}..{} lists shards {:?}, not each of its shards in order",
                    n.lo,
                    n.hi,
                    n.shards.iter().map(|s| s.shard).collect::<Vec<_>>()
                ),
            ));
        }
        Ok(NodeWork {
            node,
            shards: n.shards.into_iter().map(Into::into).collect(),
        })
    }
}

impl From<Task> for pb::Task {
    fn from(t: Task) -> Self {
        pb::Task {
            step: t.step,
            epoch: t.epoch,
            params: Some(t.params.into()),
            nodes: t.nodes.into_iter().map(Into::into).collect(),
            run_id: t.run_id,
            next_examples: t.next_examples.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = WireError;
    fn try_from(t: pb::Task) -> Result<Self, WireError> {
        Ok(Task {
            step: t.step,
            epoch: t.epoch,
            params: required(t.params, "Task", "params")?.try_into()?,
            nodes: t
                .nodes
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            run_id: t.run_id,
            next_examples: t.next_examples.into_iter().map(Into::into).collect(),
        })
    }
}

impl From<TaskReply> for pb::NextTaskReply {
    fn from(r: TaskReply) -> Self {
        use pb::next_task_reply::Kind;
        pb::NextTaskReply {
            kind: Some(match r {
                TaskReply::Task(task) => Kind::Task(task.into()),
                TaskReply::Wait => Kind::Wait(pb::Wait {}),
                TaskReply::Done(reason) => Kind::Done(pb::Done { reason }),
            }),
        }
    }
}

impl TryFrom<pb::NextTaskReply> for TaskReply {
    type Error = WireError;
    fn try_from(r: pb::NextTaskReply) -> Result<Self, WireError> {
        use pb::next_task_reply::Kind;
        Ok(match required(r.kind, "NextTaskReply", "kind")? {
            Kind::Task(task) => TaskReply::Task(task.try_into()?),
            Kind::Wait(_) => TaskReply::Wait,
            Kind::Done(done) => TaskReply::Done(done.reason),
        })
    }
}

// ---- results ----

impl From<NodeResult> for pb::NodeResult {
    fn from(r: NodeResult) -> Self {
        pb::NodeResult {
            lo: r.node.lo,
            hi: r.node.hi,
            grad: Some(r.grad.into()),
            examples: r.stats.examples,
            elbo: r.stats.elbo,
            recon: r.stats.recon,
            kl: r.stats.kl,
        }
    }
}

impl TryFrom<pb::NodeResult> for NodeResult {
    type Error = WireError;
    fn try_from(r: pb::NodeResult) -> Result<Self, WireError> {
        const MSG: &str = "NodeResult";
        let node = node(r.lo, r.hi, MSG)?;
        for (name, value) in [("elbo", r.elbo), ("recon", r.recon), ("kl", r.kl)] {
            if !value.is_finite() {
                return Err(malformed(
                    MSG,
                    format!("{name} of shards {}..{} is {value}", r.lo, r.hi),
                ));
            }
        }
        Ok(NodeResult {
            node,
            grad: required(r.grad, MSG, "grad")?.try_into()?,
            stats: BatchStats {
                examples: r.examples,
                elbo: r.elbo,
                recon: r.recon,
                kl: r.kl,
            },
        })
    }
}

impl From<Submission> for pb::SubmitRequest {
    fn from(s: Submission) -> Self {
        pb::SubmitRequest {
            step: s.step,
            results: s.results.into_iter().map(Into::into).collect(),
            compute_seconds: s.compute_seconds,
        }
    }
}

impl TryFrom<pb::SubmitRequest> for Submission {
    type Error = WireError;
    fn try_from(s: pb::SubmitRequest) -> Result<Self, WireError> {
        if !(s.compute_seconds.is_finite() && s.compute_seconds >= 0.0) {
            return Err(malformed(
                "SubmitRequest",
                format!("compute_seconds is {}", s.compute_seconds),
            ));
        }
        Ok(Submission {
            step: s.step,
            results: s
                .results
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            compute_seconds: s.compute_seconds,
        })
    }
}

impl From<Verdict> for pb::SubmitReply {
    fn from(v: Verdict) -> Self {
        pb::SubmitReply {
            accepted: v.accepted,
            reason: v.reason,
        }
    }
}

impl From<pb::SubmitReply> for Verdict {
    fn from(r: pb::SubmitReply) -> Self {
        Verdict {
            accepted: r.accepted,
            reason: r.reason,
        }
    }
}

impl From<Liveness> for pb::HeartbeatReply {
    fn from(l: Liveness) -> Self {
        pb::HeartbeatReply {
            known: l == Liveness::Known,
            done: l == Liveness::Done,
        }
    }
}

impl From<pb::HeartbeatReply> for Liveness {
    fn from(r: pb::HeartbeatReply) -> Self {
        match (r.done, r.known) {
            (true, _) => Liveness::Done,
            (false, true) => Liveness::Known,
            (false, false) => Liveness::Unknown,
        }
    }
}

/// The inline bytes of `values` (one copy, shared by every message that carries them).
pub fn inline_tensor(values: &[f32]) -> TensorRef {
    TensorRef::Inline(tensor::encode_f32(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `value`, decodes it back, and checks it is unchanged.
    fn round_trip<D, P>(value: D)
    where
        D: Clone + PartialEq + std::fmt::Debug + Into<P> + TryFrom<P>,
        <D as TryFrom<P>>::Error: std::fmt::Debug,
    {
        let wire: P = value.clone().into();
        assert_eq!(D::try_from(wire).unwrap(), value);
    }

    fn task() -> Task {
        Task {
            step: 41,
            epoch: 2,
            params: inline_tensor(&[1.0, -0.0, f32::MIN_POSITIVE]),
            nodes: vec![NodeWork {
                node: Node { lo: 4, hi: 6 },
                shards: vec![
                    ShardWork {
                        shard: 4,
                        examples: vec![9, 3],
                    },
                    ShardWork {
                        shard: 5,
                        examples: vec![],
                    },
                ],
            }],
            run_id: "abc".into(),
            next_examples: vec![ShardWork {
                shard: 4,
                examples: vec![7, 1],
            }],
        }
    }

    #[test]
    fn every_message_round_trips() {
        round_trip::<_, pb::RegisterRequest>(Registration {
            protocol_version: 2,
            name: "w (host)".into(),
            threads: 3,
            build: "0.1.0".into(),
        });
        let run = RunSpec {
            model: ModelConfig {
                input_dim: 5,
                hidden: vec![4, 3],
                latent: 2,
                likelihood: Likelihood::Gaussian { variance: 0.25 },
            },
            samples: 3,
            seed: u64::MAX,
            shards: 16,
            run_id: "f00d".into(),
        };
        round_trip::<_, pb::RunConfig>(run.clone());
        round_trip::<_, pb::ModelConfig>(ModelConfig::default());
        let worker_key = crate::credentials::WorkerKey::random();
        round_trip::<_, pb::RegisterReply>(Registered {
            worker_id: 7,
            worker_key,
            run: run.clone(),
            shared_memory: Some(SharedMemoryOffer {
                dir: "/dev/shm/vae-1".into(),
                probe_file: "probe".into(),
            }),
        });
        round_trip::<_, pb::RegisterReply>(Registered {
            worker_id: 7,
            worker_key,
            run,
            shared_memory: None,
        });
        round_trip::<_, pb::ShardChunk>(ShardChunk {
            shard: 3,
            first_example: 100,
            examples: 2,
            dim: 2,
            pixels: ShardPixels::Inline(vec![0.0, 0.25, 0.5, 1.0]),
        });
        round_trip::<_, pb::ShardChunk>(ShardChunk {
            shard: 3,
            first_example: 100,
            examples: 2,
            dim: 2,
            pixels: ShardPixels::SharedFile { offset: 64 },
        });
        round_trip::<_, pb::Task>(task());
        round_trip::<_, pb::Task>(Task {
            params: TensorRef::ParameterFile { slot: 3, len: 10 },
            ..task()
        });
        round_trip::<_, pb::NextTaskReply>(TaskReply::Task(task()));
        round_trip::<_, pb::NextTaskReply>(TaskReply::Wait);
        round_trip::<_, pb::NextTaskReply>(TaskReply::Done("over".into()));
        let result = NodeResult {
            node: Node { lo: 0, hi: 8 },
            grad: TensorRef::Shared {
                offset: 4096,
                len: 10,
            },
            stats: BatchStats {
                examples: 64,
                elbo: -1.5,
                recon: -1.0,
                kl: 0.5,
            },
        };
        round_trip::<_, pb::SubmitRequest>(Submission {
            step: 2,
            results: vec![
                result.clone(),
                NodeResult {
                    grad: inline_tensor(&[3.0]),
                    ..result
                },
            ],
            compute_seconds: 0.25,
        });
        let attach = Attach {
            probe: vec![1, 2, 3],
        };
        assert_eq!(
            Attach::from(pb::AttachRequest::from(attach.clone())),
            attach
        );
        for verdict in [
            Verdict {
                accepted: true,
                reason: String::new(),
            },
            Verdict {
                accepted: false,
                reason: "late".into(),
            },
        ] {
            assert_eq!(
                Verdict::from(pb::SubmitReply::from(verdict.clone())),
                verdict
            );
        }
        for l in [Liveness::Known, Liveness::Unknown, Liveness::Done] {
            assert_eq!(Liveness::from(pb::HeartbeatReply::from(l)), l);
        }
    }

    #[test]
    fn malformed_messages_are_refused_with_the_field_named() {
        let mut wire = pb::Task::from(task());
        wire.nodes[0].shards.swap(0, 1);
        let e = Task::try_from(wire).unwrap_err();
        assert!(e.to_string().contains("lists shards [5, 4]"), "{e}");

        let mut wire = pb::Task::from(task());
        wire.params = None;
        assert!(
            Task::try_from(wire)
                .unwrap_err()
                .to_string()
                .contains("params")
        );

        let mut wire = pb::Task::from(task());
        wire.params = Some(pb::TensorRef {
            location: Some(pb::tensor_ref::Location::ParameterFile(pb::ParameterFile {
                slot: crate::shared_memory::PARAM_SLOTS,
                len: 10,
            })),
        });
        assert!(
            Task::try_from(wire)
                .unwrap_err()
                .to_string()
                .contains("parameter file 4 does not exist")
        );

        let mut wire = pb::Task::from(task());
        wire.params = Some(pb::TensorRef {
            location: Some(pb::tensor_ref::Location::Inline(vec![0u8; 7].into())),
        });
        assert!(
            Task::try_from(wire)
                .unwrap_err()
                .to_string()
                .contains("7 bytes")
        );

        let mut model = pb::ModelConfig::from(ModelConfig::default());
        model.likelihood = 9;
        assert!(
            ModelConfig::try_from(model)
                .unwrap_err()
                .to_string()
                .contains("likelihood")
        );

        let result = pb::NodeResult {
            lo: 2,
            hi: 2,
            ..Default::default()
        };
        assert!(
            NodeResult::try_from(result)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        let result = pb::NodeResult {
            lo: 0,
            hi: 1,
            grad: Some(inline_tensor(&[1.0]).into()),
            kl: f64::NAN,
            ..Default::default()
        };
        assert!(
            NodeResult::try_from(result)
                .unwrap_err()
                .to_string()
                .contains("kl")
        );

        let chunk = pb::ShardChunk {
            shard: 1,
            examples: 2,
            dim: 3,
            pixels: vec![0u8; 20].into(),
            ..Default::default()
        };
        assert!(ShardChunk::try_from(chunk).is_err());
        // A shared region must be exactly the chunk's values, aligned, with nothing inline.
        let shared = |offset, len, inline: usize| pb::ShardChunk {
            shard: 1,
            examples: 2,
            dim: 3,
            pixels: vec![0u8; inline].into(),
            shared: Some(pb::SharedRegion { offset, len }),
            ..Default::default()
        };
        assert!(ShardChunk::try_from(shared(0, 6, 0)).is_ok());
        for (offset, len, inline) in [(0, 5, 0), (0, 7, 0), (2, 6, 0), (0, 6, 24)] {
            let err = ShardChunk::try_from(shared(offset, len, inline)).unwrap_err();
            assert!(err.to_string().contains("shared region"), "{err}");
        }
        // 2^31 x 2^31 values are 2^64 bytes, which wraps to 0 unchecked.
        let chunk = pb::ShardChunk {
            examples: 1 << 31,
            dim: 1 << 31,
            ..Default::default()
        };
        assert!(ShardChunk::try_from(chunk).is_err());

        let mut reply = pb::RegisterReply::from(Registered {
            worker_id: 1,
            worker_key: crate::credentials::WorkerKey::random(),
            run: RunSpec {
                model: ModelConfig::default(),
                samples: 1,
                seed: 0,
                shards: 1,
                run_id: String::new(),
            },
            shared_memory: Some(SharedMemoryOffer {
                dir: "/dev/shm/x".into(),
                probe_file: "p".into(),
            }),
        });
        reply.shared_memory.as_mut().unwrap().probe_file = "../../etc/passwd".into();
        assert!(Registered::try_from(reply).is_err());

        let submit = pb::SubmitRequest {
            compute_seconds: -1.0,
            ..Default::default()
        };
        assert!(Submission::try_from(submit).is_err());
    }
}
