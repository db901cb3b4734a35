//! The docs/design.md §2 invariant: the reduction tree's order of additions, whichever fold or
//! set of covering nodes computes it; and at the level of the engine, a node's gradient is the
//! same bits whatever the thread count and however its sub-nodes were split between processes;
//! noise is a function of the example, not of the request; evaluation is deterministic too.

use std::collections::HashMap;

use common::model::KeyedRng;
use common::model::{Likelihood, ModelConfig};
use common::model::{fill_eps, sample_eps};
use common::train::GradientSum;
use common::train::{Engine, Node, ReductionTree, ShardBatch, TreeSum};
use ndarray::Array2;

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// The default 784-400-20 model: big enough that products split into pieces and elementwise
/// passes go parallel, so thread counts really change who computes what.
fn big_model(likelihood: Likelihood) -> ModelConfig {
    ModelConfig {
        likelihood,
        ..ModelConfig::default()
    }
}

fn small_model() -> ModelConfig {
    ModelConfig {
        input_dim: 12,
        hidden: vec![10, 6],
        latent: 3,
        likelihood: Likelihood::Bernoulli,
    }
}

/// `shards` shards of `per_shard` examples each: data in [0, 1] and global example ids.
struct Step {
    x: Vec<Array2<f32>>,
    ids: Vec<Vec<u32>>,
}

impl Step {
    fn new(input_dim: usize, shards: usize, per_shard: usize, salt: u64) -> Step {
        let mut rng = KeyedRng::new(&[31, salt]);
        let x = (0..shards)
            .map(|_| Array2::from_shape_fn((per_shard, input_dim), |_| rng.next_open01() as f32))
            .collect();
        let ids = (0..shards)
            .map(|s| {
                (0..per_shard as u32)
                    .map(|i| 1000 * s as u32 + 3 * i)
                    .collect()
            })
            .collect();
        Step { x, ids }
    }

    fn batches(&self, node: Node) -> Vec<ShardBatch<'_>> {
        (node.lo..node.hi)
            .map(|s| ShardBatch {
                shard: s,
                x: self.x[s as usize].view(),
                examples: &self.ids[s as usize],
            })
            .collect()
    }
}

/// The fewest tree nodes that together hold exactly `owned` (shard ids, any order): what a
/// process owning those shards sends. Nodes come back in ascending order.
fn cover(tree: &ReductionTree, owned: &[u32]) -> Vec<Node> {
    tree.root().fold(
        &mut |node| {
            let mine = (node.lo..node.hi).filter(|s| owned.contains(s)).count();
            match mine {
                0 if !node.is_empty() => Some(Vec::new()),
                n if n == node.len() as usize => Some(vec![node]),
                _ => None,
            }
        },
        &mut |mut left, right| {
            left.extend(right);
            left
        },
    )
}

/// A sum that records its shape, so the tests can see the order of additions.
#[derive(Debug, Clone, PartialEq)]
struct Expr(String);

impl TreeSum for Expr {
    fn add_assign(&mut self, other: &Self) {
        self.0 = format!("({}+{})", self.0, other.0);
    }
}

fn leaf(s: u32) -> (Node, Expr) {
    (Node { lo: s, hi: s + 1 }, Expr(s.to_string()))
}

#[test]
fn the_tree_is_balanced() {
    let tree = ReductionTree::new(4);
    let sum = tree.evaluate_root((0..4).map(leaf).collect()).unwrap();
    assert_eq!(sum.0, "((0+1)+(2+3))");
    let tree = ReductionTree::new(5);
    let sum = tree.evaluate_root((0..5).map(leaf).collect()).unwrap();
    assert_eq!(sum.0, "((0+1)+(2+(3+4)))");
}

#[test]
fn missing_or_overlapping_results_are_errors() {
    let tree = ReductionTree::new(4);
    let mut partial: HashMap<_, _> = (0..3).map(leaf).collect();
    assert!(tree.evaluate_root(partial.clone()).is_err());
    partial.insert(Node { lo: 3, hi: 4 }, Expr("3".into()));
    partial.insert(Node { lo: 0, hi: 2 }, Expr("01".into()));
    assert!(tree.evaluate_root(partial).is_err());
}

#[test]
fn every_fold_gives_the_tree_s_expression() {
    for shards in 1..=9u32 {
        let tree = ReductionTree::new(shards as usize);
        let want = tree.evaluate_root((0..shards).map(leaf).collect()).unwrap();
        let name = |node: Node| node.lo.to_string();
        let plus = |left: String, right: String| format!("({left}+{right})");
        let sequential = tree
            .root()
            .fold_leaves(&mut |n| name(n), &mut |l, r| plus(l, r));
        let parallel = tree.root().par_fold_leaves(&name, &plus);
        let leaves = (0..shards).map(|s| leaf(s).1).collect();
        assert_eq!(sequential, want.0);
        assert_eq!(parallel, want.0);
        assert_eq!(tree.sum_leaves(tree.root(), leaves), want);
    }
}

#[test]
fn partial_sums_from_covers_give_the_same_expression() {
    let tree = ReductionTree::new(16);
    let whole = tree.evaluate_root((0..16).map(leaf).collect()).unwrap();
    // Three owners with uneven, non-aligned blocks.
    let owners: [Vec<u32>; 3] = [(0..6).collect(), (6..11).collect(), (11..16).collect()];
    let mut values = HashMap::new();
    for owned in &owners {
        for node in cover(&tree, owned) {
            let leaves = (node.lo..node.hi).map(|s| leaf(s).1).collect();
            values.insert(node, tree.sum_leaves(node, leaves));
        }
    }
    assert_eq!(tree.evaluate_root(values).unwrap(), whole);
}

#[test]
fn covers_are_minimal_tree_nodes() {
    let tree = ReductionTree::new(16);
    assert_eq!(
        cover(&tree, &(0..16).collect::<Vec<_>>()),
        vec![tree.root()]
    );
    assert_eq!(cover(&tree, &[4, 5, 6, 7]), vec![Node { lo: 4, hi: 8 }]);
    assert_eq!(
        cover(&tree, &[6, 7, 8, 9, 10]),
        vec![
            Node { lo: 6, hi: 8 },
            Node { lo: 8, hi: 10 },
            Node { lo: 10, hi: 11 }
        ]
    );
    assert!(tree.contains(Node { lo: 8, hi: 12 }));
    assert!(!tree.contains(Node { lo: 6, hi: 10 }));
}

fn bits(sum: &GradientSum) -> (Vec<u32>, u64, [u64; 3]) {
    (
        sum.grad.iter().map(|g| g.to_bits()).collect(),
        sum.stats.examples,
        [
            sum.stats.elbo.to_bits(),
            sum.stats.recon.to_bits(),
            sum.stats.kl.to_bits(),
        ],
    )
}

#[test]
fn node_gradients_are_bit_identical_for_1_2_and_8_threads() {
    for (likelihood, shards, per_shard) in [
        (Likelihood::Bernoulli, 1, 128),
        (Likelihood::Bernoulli, 4, 32),
        (Likelihood::Gaussian { variance: 0.5 }, 2, 48),
    ] {
        let engine = Engine::new(big_model(likelihood), 2, 5).unwrap();
        let params = engine.init_params();
        let step = Step::new(784, shards, per_shard, 1);
        let tree = ReductionTree::new(shards);
        let root = tree.root();
        let results: Vec<_> = [1, 2, 8]
            .into_iter()
            .map(|threads| {
                pool(threads).install(|| {
                    engine
                        .node_gradient(&params, 3, &tree, root, &step.batches(root))
                        .unwrap()
                })
            })
            .collect();
        assert_eq!(results[0].stats.examples, (shards * per_shard) as u64);
        assert!(results[0].grad.iter().any(|g| *g != 0.0));
        assert_eq!(bits(&results[0]), bits(&results[1]), "1 vs 2 threads");
        assert_eq!(bits(&results[0]), bits(&results[2]), "1 vs 8 threads");
    }
}

/// A 3-worker run of 16 shards: every worker sends the fewest tree nodes covering its shards,
/// each computed by its own engine (as in its own process) in a pool of its own size; the
/// coordinator's `evaluate_root` must give exactly what one process gets for the root.
#[test]
fn node_sums_equal_evaluate_root_over_parts_computed_separately() {
    for config in [small_model(), big_model(Likelihood::Bernoulli)] {
        let shards = 16;
        let step = Step::new(config.input_dim, shards, 8, 2);
        let tree = ReductionTree::new(shards);
        let single = Engine::new(config.clone(), 1, 9).unwrap();
        let params = single.init_params();
        let whole = pool(2).install(|| {
            single
                .node_gradient(&params, 1, &tree, tree.root(), &step.batches(tree.root()))
                .unwrap()
        });

        let owners: [Vec<u32>; 3] = [(0..6).collect(), (6..11).collect(), (11..16).collect()];
        let mut received = HashMap::new();
        for (w, owned) in owners.iter().enumerate() {
            let worker = Engine::new(config.clone(), 1, 9).unwrap();
            let threads = [1, 3, 8][w];
            for node in cover(&tree, owned) {
                let sum = pool(threads).install(|| {
                    worker
                        .node_gradient(&params, 1, &tree, node, &step.batches(node))
                        .unwrap()
                });
                received.insert(node, sum);
            }
        }
        assert!(received.len() > 3, "covers split into several nodes");
        let assembled = tree.evaluate_root(received).unwrap();
        assert_eq!(bits(&whole), bits(&assembled));

        // And from single leaves, summed along the tree by the receiver.
        let leaves: Vec<GradientSum> = (0..shards as u32)
            .map(|s| {
                let leaf = Node { lo: s, hi: s + 1 };
                single
                    .node_gradient(&params, 1, &tree, leaf, &step.batches(leaf))
                    .unwrap()
            })
            .collect();
        assert_eq!(bits(&whole), bits(&tree.sum_leaves(tree.root(), leaves)));
    }
}

#[test]
fn empty_shards_contribute_nothing() {
    let engine = Engine::new(small_model(), 1, 3).unwrap();
    let params = engine.init_params();
    let step = Step::new(12, 2, 5, 3);
    let empty_x = Array2::<f32>::zeros((0, 12));
    let tree = ReductionTree::new(2);
    let batches = [
        step.batches(Node { lo: 0, hi: 1 })[0],
        ShardBatch {
            shard: 1,
            x: empty_x.view(),
            examples: &[],
        },
    ];
    let sum = engine
        .node_gradient(&params, 0, &tree, tree.root(), &batches)
        .unwrap();
    let alone = engine
        .node_gradient(&params, 0, &tree, Node { lo: 0, hi: 1 }, &batches[..1])
        .unwrap();
    assert_eq!(sum.stats.examples, 5);
    assert_eq!(bits(&sum), bits(&alone), "x + 0 = x");
}

#[test]
fn noise_does_not_depend_on_request_order_or_batch() {
    let (seed, epoch, z) = (17, 4, 5);
    let forward = [10u32, 11, 12, 13];
    let backward = [13u32, 12, 11, 10];
    let mut a = vec![0.0f32; 4 * 2 * z];
    let mut b = vec![0.0f32; 4 * 2 * z];
    fill_eps(seed, epoch, &forward, 0, 2, z, &mut a);
    fill_eps(seed, epoch, &backward, 0, 2, z, &mut b);
    for i in 0..4 {
        let row_a = &a[i * 2 * z..(i + 1) * 2 * z];
        let row_b = &b[(3 - i) * 2 * z..(4 - i) * 2 * z];
        assert_eq!(row_a, row_b, "example {}", forward[i]);
        // The same as drawing that example alone, sample by sample.
        let mut alone = vec![0.0f32; z];
        sample_eps(seed, epoch, forward[i] as u64, 1, &mut alone);
        assert_eq!(&row_a[z..], &alone[..]);
    }
    // Many examples take the parallel path; the rows are still the per-example draws.
    let many: Vec<u32> = (0..200).rev().collect();
    let mut big = vec![0.0f32; 200 * z];
    fill_eps(seed, epoch, &many, 0, 1, z, &mut big);
    let mut alone = vec![0.0f32; z];
    sample_eps(seed, epoch, 57, 0, &mut alone);
    let row = 199 - 57;
    assert_eq!(&big[row * z..(row + 1) * z], &alone[..]);
    // Different epochs draw different noise.
    let mut other = vec![0.0f32; 4 * 2 * z];
    fill_eps(seed, epoch + 1, &forward, 0, 2, z, &mut other);
    assert_ne!(a, other);
}

#[test]
fn seed_and_epoch_change_the_gradient() {
    let step = Step::new(12, 2, 6, 4);
    let tree = ReductionTree::new(2);
    let root = tree.root();
    let first = Engine::new(small_model(), 1, 1).unwrap();
    let params = first.init_params();
    let second = Engine::new(small_model(), 1, 2).unwrap();
    let g1 = first
        .node_gradient(&params, 0, &tree, root, &step.batches(root))
        .unwrap();
    let g1_again = first
        .node_gradient(&params, 0, &tree, root, &step.batches(root))
        .unwrap();
    let g2 = second
        .node_gradient(&params, 0, &tree, root, &step.batches(root))
        .unwrap();
    let g1_next_epoch = first
        .node_gradient(&params, 1, &tree, root, &step.batches(root))
        .unwrap();
    assert_eq!(
        bits(&g1),
        bits(&g1_again),
        "buffers reused from the pool change nothing"
    );
    assert_ne!(g1.grad, g2.grad, "another seed draws other noise");
    assert_ne!(
        g1.grad, g1_next_epoch.grad,
        "another epoch draws other noise"
    );
}

#[test]
fn malformed_requests_are_errors() {
    let engine = Engine::new(small_model(), 1, 1).unwrap();
    let params = engine.init_params();
    let step = Step::new(12, 4, 3, 5);
    let tree = ReductionTree::new(4);
    let not_a_node = Node { lo: 1, hi: 3 };
    assert!(
        engine
            .node_gradient(&params, 0, &tree, not_a_node, &step.batches(not_a_node))
            .is_err()
    );
    let node = Node { lo: 0, hi: 2 };
    let mut batches = step.batches(node);
    batches.swap(0, 1);
    let err = engine
        .node_gradient(&params, 0, &tree, node, &batches)
        .unwrap_err();
    assert!(err.to_string().contains("expected shard 0"), "{err}");
    let wide = Array2::<f32>::zeros((3, 13));
    let bad = [ShardBatch {
        shard: 0,
        x: wide.view(),
        examples: &step.ids[0],
    }];
    let leaf = Node { lo: 0, hi: 1 };
    let err = engine
        .node_gradient(&params, 0, &tree, leaf, &bad)
        .unwrap_err();
    assert!(err.to_string().contains("input dimension is 12"), "{err}");
    assert!(
        engine
            .node_gradient(&params[1..], 0, &tree, leaf, &step.batches(leaf))
            .is_err()
    );
}

fn eval_data(rows: usize, input_dim: usize) -> Array2<f32> {
    let mut rng = KeyedRng::new(&[77]);
    // Sparse binary-ish images, like MNIST.
    Array2::from_shape_fn((rows, input_dim), |_| {
        if rng.next_open01() < 0.2 { 1.0 } else { 0.0 }
    })
}

#[test]
fn evaluation_is_bit_identical_across_thread_counts() {
    let engine = Engine::new(big_model(Likelihood::Bernoulli), 1, 8).unwrap();
    let params = engine.init_params();
    let x = eval_data(300, 784); // three chunks, the last partial
    let reports: Vec<_> = [1, 2, 8]
        .into_iter()
        .map(|t| pool(t).install(|| engine.evaluate(&params, x.view(), 4).unwrap()))
        .collect();
    let key = |r: &common::model::EvalReport| {
        (
            r.examples,
            r.elbo.to_bits(),
            r.recon.to_bits(),
            r.kl.to_bits(),
            r.iw_bound.map(f64::to_bits),
        )
    };
    assert_eq!(reports[0].examples, 300);
    assert_eq!(key(&reports[0]), key(&reports[1]));
    assert_eq!(key(&reports[0]), key(&reports[2]));
    // Same figure epoch after epoch: evaluation noise has its own fixed key.
    let again = engine.evaluate(&params, x.view(), 4).unwrap();
    assert_eq!(key(&reports[0]), key(&again));
    let skipped = engine.evaluate(&params, x.view(), 0).unwrap();
    assert_eq!(skipped.iw_bound, None);
    assert_eq!(skipped.elbo.to_bits(), reports[0].elbo.to_bits());
}

/// The IW bound is a tighter lower bound on log p(x): on average it is above the ELBO and grows
/// with k. Parameters are scaled up from the initialisation so the posterior is far from the
/// prior and the gaps are large compared with the Monte-Carlo noise.
#[test]
fn importance_weighted_bound_tightens_with_k() {
    let config = ModelConfig {
        input_dim: 30,
        hidden: vec![20],
        latent: 4,
        likelihood: Likelihood::Bernoulli,
    };
    let engine = Engine::new(config, 1, 12).unwrap();
    let params: Vec<f32> = engine.init_params().iter().map(|p| 3.0 * p).collect();
    let x = eval_data(400, 30);
    let iw = |k| engine.evaluate(&params, x.view(), k).unwrap();
    let (r1, r10, r100) = (iw(1), iw(10), iw(100));
    let elbo = r1.elbo;
    let (b1, b10, b100) = (
        r1.iw_bound.unwrap(),
        r10.iw_bound.unwrap(),
        r100.iw_bound.unwrap(),
    );
    assert!(
        b10 > b1 + 0.05 && b100 > b10 + 0.05,
        "IW bound should grow with k: k=1 {b1}, k=10 {b10}, k=100 {b100}"
    );
    assert!(
        b100 > elbo + 0.1,
        "IW(100) {b100} should exceed the ELBO {elbo}"
    );
    // k = 1 estimates the ELBO itself (MC KL instead of closed form): close on 400 examples.
    assert!(
        (b1 - elbo).abs() < 0.05 * elbo.abs(),
        "IW(1) {b1} vs ELBO {elbo}"
    );
}

/// A node's shards stacked into one batch give exactly the tree sum of each shard computed alone
/// (including an empty shard), with K = 2 samples so decoder rows are example x sample.
#[test]
fn stacked_shards_equal_the_tree_sum_of_shards_alone() {
    use common::model::{Vae, Workspace};
    let vae = Vae::new(big_model(Likelihood::Bernoulli)).unwrap();
    let params: Vec<f32> = common::model::init_params(vae.layout(), 4);
    let sizes = [5usize, 0, 8, 3, 6];
    let n: usize = sizes.iter().sum();
    let (k, z) = (2, vae.config().latent);
    let mut rng = KeyedRng::new(&[5]);
    let x = Array2::from_shape_fn((n, 784), |_| rng.next_open01() as f32);
    let ids: Vec<u32> = (0..n as u32).collect();
    let mut eps = Array2::<f32>::zeros((n * k, z));
    fill_eps(3, 0, &ids, 0, k, z, eps.as_slice_mut().unwrap());

    // The root of a 5-shard tree: ((0 + 1) + (2 + (3 + 4))).
    let tree = ReductionTree::new(5);
    let mut stacked = vec![f32::NAN; params.len()];
    let sums = pool(2).install(|| {
        vae.elbo_grad_tree(
            &params,
            x.view(),
            eps.view(),
            tree.root(),
            &sizes,
            &mut stacked,
            &mut Workspace::new(),
        )
        .unwrap()
    });

    let mut first = 0;
    let mut leaves = Vec::new();
    for &len in &sizes {
        let xs = x.slice(ndarray::s![first..first + len, ..]);
        let es = eps.slice(ndarray::s![first * k..(first + len) * k, ..]);
        let mut alone = GradientSum::zeros(params.len());
        alone.stats = vae
            .elbo_grad(&params, xs, es, &mut alone.grad, &mut Workspace::new())
            .unwrap();
        leaves.push(alone);
        first += len;
    }
    let want = tree.sum_leaves(tree.root(), leaves);
    let got = GradientSum {
        grad: stacked,
        stats: sums,
    };
    assert_eq!(got.stats.examples, n as u64);
    assert_eq!(bits(&got), bits(&want));
}
