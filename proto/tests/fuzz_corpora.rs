//! The fuzz corpus of the protocol's messages (`fuzz/corpus/proto_messages`), replayed on the
//! stable toolchain through the function the fuzz target calls (`fuzz/src/wire.rs`: decode every
//! message type, convert it to its domain type and back), in a child process whose peak memory is
//! bounded. docs/fuzzing.md says how the corpus was made.
//!
//! `cargo test -p proto --test fuzz_corpora -- --ignored write_seed_corpus` rewrites the
//! hand-made seeds (`seed-*` files): one valid message of every type.

#[path = "../../common/tests/support/peak_memory.rs"]
mod peak_memory;
#[path = "../../fuzz/src/wire.rs"]
mod wire;

/// Peak resident memory the corpus may add (its largest input is 64 KiB).
const RSS_MIB: u64 = 64;
/// Peak address space it may add (catches allocations sized by a field, even untouched).
const VIRTUAL_MIB: u64 = 256;

#[test]
fn replay_proto_messages_corpus() {
    peak_memory::replay_corpus(
        "replay_proto_messages_corpus",
        "proto_messages",
        wire::proto_messages,
        RSS_MIB,
        VIRTUAL_MIB,
    );
}

#[test]
#[ignore = "writes fuzz/corpus/proto_messages/seed-*; run by hand when the protocol changes"]
fn write_seed_corpus() {
    use common::model::{BatchStats, Likelihood, ModelConfig};
    use common::train::Node;
    use prost::Message;
    use proto::convert::inline_tensor;
    use proto::credentials::WorkerKey;
    use proto::messages::*;
    use proto::pb;

    let dir = peak_memory::corpus_dir("proto_messages");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |kind: u8, name: &str, message: &dyn Fn() -> Vec<u8>| {
        let bytes = [vec![kind], message()].concat();
        wire::proto_messages(&bytes);
        std::fs::write(dir.join(format!("seed-{kind:02}-{name}")), bytes).unwrap();
    };
    let run = RunSpec {
        model: ModelConfig {
            input_dim: 6,
            hidden: vec![4, 3],
            latent: 2,
            likelihood: Likelihood::Gaussian { variance: 0.5 },
        },
        samples: 2,
        seed: 7,
        shards: 4,
        run_id: "abc".into(),
    };
    let task = Task {
        step: 3,
        epoch: 1,
        params: inline_tensor(&[0.5, -1.0, 2.0]),
        nodes: vec![NodeWork {
            node: Node { lo: 2, hi: 4 },
            shards: vec![
                ShardWork {
                    shard: 2,
                    examples: vec![9, 1, 4],
                },
                ShardWork {
                    shard: 3,
                    examples: vec![300, 70000],
                },
            ],
        }],
        run_id: "abc".into(),
        next_examples: vec![ShardWork {
            shard: 2,
            examples: vec![5, 8, 2],
        }],
    };
    let result = NodeResult {
        node: Node { lo: 0, hi: 2 },
        grad: inline_tensor(&[1.0, 2.0]),
        stats: BatchStats {
            examples: 8,
            elbo: -100.5,
            recon: -90.0,
            kl: 10.5,
        },
    };
    write(0, "register", &|| {
        pb::RegisterRequest::from(Registration {
            protocol_version: 3,
            name: "host (pid 1)".into(),
            threads: 2,
            build: "0.1.0".into(),
        })
        .encode_to_vec()
    });
    write(1, "model", &|| {
        pb::ModelConfig::from(run.model.clone()).encode_to_vec()
    });
    write(2, "run", &|| {
        pb::RunConfig::from(run.clone()).encode_to_vec()
    });
    write(3, "registered", &|| {
        pb::RegisterReply::from(Registered {
            worker_id: 5,
            worker_key: WorkerKey::random(),
            run: run.clone(),
            shared_memory: Some(SharedMemoryOffer {
                dir: "/dev/shm/vae-x".into(),
                probe_file: "probe".into(),
            }),
        })
        .encode_to_vec()
    });
    write(4, "attach", &|| {
        pb::AttachRequest::from(Attach {
            probe: vec![1, 2, 3],
        })
        .encode_to_vec()
    });
    write(5, "chunk", &|| {
        pb::ShardChunk::from(ShardChunk {
            shard: 1,
            first_example: 10,
            examples: 2,
            dim: 3,
            pixels: ShardPixels::Inline(vec![0.0, 0.25, 0.5, 0.75, 1.0, 0.125]),
        })
        .encode_to_vec()
    });
    write(6, "tensor-shared", &|| {
        pb::TensorRef::from(TensorRef::Shared {
            offset: 4096,
            len: 10,
        })
        .encode_to_vec()
    });
    write(7, "node", &|| {
        pb::NodeWork::from(task.nodes[0].clone()).encode_to_vec()
    });
    write(8, "task", &|| pb::Task::from(task.clone()).encode_to_vec());
    write(9, "reply-task", &|| {
        pb::NextTaskReply::from(TaskReply::Task(task.clone())).encode_to_vec()
    });
    write(9, "reply-done", &|| {
        pb::NextTaskReply::from(TaskReply::Done("finished".into())).encode_to_vec()
    });
    write(10, "result", &|| {
        pb::NodeResult::from(result.clone()).encode_to_vec()
    });
    write(11, "submit", &|| {
        pb::SubmitRequest::from(Submission {
            step: 3,
            results: vec![result.clone()],
            compute_seconds: 0.25,
        })
        .encode_to_vec()
    });
    write(12, "verdict", &|| {
        pb::SubmitReply::from(Verdict {
            accepted: false,
            reason: "late".into(),
        })
        .encode_to_vec()
    });
    write(13, "heartbeat", &|| {
        pb::HeartbeatReply::from(Liveness::Known).encode_to_vec()
    });
    write(14, "capabilities", &|| {
        pb::Capabilities {
            threads: 4,
            build: "x".into(),
        }
        .encode_to_vec()
    });
    write(17, "fetch", &|| {
        pb::FetchShardRequest { shard: 3 }.encode_to_vec()
    });
    write(21, "shard-work", &|| {
        pb::ShardWork::from(task.nodes[0].shards[0].clone()).encode_to_vec()
    });
    write(22, "region", &|| {
        pb::SharedRegion { offset: 8, len: 2 }.encode_to_vec()
    });
}
