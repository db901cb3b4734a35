//! `worker bench`: times full training steps (noise, forward, backward, tree sum, Adam) of a model
//! on random data, on a rayon pool of its own, as a worker holding every shard would run them.
//!
//! The headline figure is examples per second over the timed window. The breakdown beneath it is
//! measured by timing each part alone on the same pool (forward-only passes, the step's GEMMs
//! replayed with their exact shapes and operand layouts, the noise, the optimizer), so its parts
//! add up only approximately to the step.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use common::kernels::{gemm, tree_weight_grad};
use common::model::{
    KeyedRng, Likelihood, ModelConfig, Vae, Workspace, domain, fill_eps, model_name, parse_hidden,
};
use common::optim::OptimizerConfig;
use common::train::{Engine, GradientSum, ReductionTree, ShardBatch};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};

use crate::bench_products::{PRODUCT_REPS, StepLayer, step_layers, time_products, widest};
use crate::compute::IdleThreads;

/// `println!` that ends the report quietly when stdout is closed (`worker bench | head -1`)
/// instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        match writeln!(std::io::stdout(), $($arg)*) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            written => written?,
        }
    }};
}

/// Untimed steps before measuring (page faults, buffer pools, caches, CPU clocks).
const WARMUP: Duration = Duration::from_millis(700);
/// At least this many warm-up steps however fast they are.
const WARMUP_STEPS: usize = 5;
/// Repetitions of each part timed alone for the breakdown (the fastest run is reported).
const PART_REPS: usize = 30;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Global batch size (examples per step).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Threads of the compute pool.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seconds to time (after a warm-up).
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Hidden layer sizes, e.g. `400` or `512,256`.
    #[arg(long, default_value = "400")]
    pub hidden: String,
    /// Latent dimension.
    #[arg(long, default_value_t = 20)]
    pub latent: usize,
    /// Input dimension (784 for MNIST).
    #[arg(long, default_value_t = 784)]
    pub input: usize,
    /// Observation model: `bernoulli` or `gaussian` (variance 1).
    #[arg(long, default_value = "bernoulli")]
    pub likelihood: String,
    /// Virtual shards the batch is cut into (each computed on its own, then tree-summed).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Reparameterisation samples per example (K).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// What the pool's idle threads do between a step's parallel sections, as for `worker`.
    #[arg(long, value_enum, default_value_t = IdleThreads::Spin)]
    pub idle_threads: IdleThreads,
    /// Also time each of the step's products on its own, the engine's kernels against one
    /// `matrixmultiply` call (compare kernels with `--threads 1`).
    #[arg(long)]
    pub products: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.threads == 0 || args.batch == 0 || args.shards == 0 {
        bail!("--threads, --batch and --shards must be positive");
    }
    if !args.batch.is_multiple_of(args.shards) {
        bail!(
            "--batch {} must be a multiple of --shards {}",
            args.batch,
            args.shards
        );
    }
    if !(args.seconds > 0.0 && Duration::try_from_secs_f64(args.seconds).is_ok()) {
        bail!(
            "--seconds must be a positive number below 2^64, got {:?}",
            args.seconds
        );
    }
    let config = ModelConfig {
        input_dim: args.input,
        hidden: parse_hidden(&args.hidden)?,
        latent: args.latent,
        likelihood: Likelihood::parse(&args.likelihood, 1.0)?,
    };
    let engine = Engine::new(config.clone(), args.samples, 1)?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .context("building the compute pool")?;

    // Random data in [0, 1], one block per shard, global ids 0..batch.
    let per_shard = args.batch / args.shards;
    let mut rng = KeyedRng::new(&[domain::BENCH, 0]);
    let data: Vec<Array2<f32>> = (0..args.shards)
        .map(|_| Array2::from_shape_fn((per_shard, args.input), |_| rng.next_open01() as f32))
        .collect();
    let ids: Vec<Vec<u32>> = (0..args.shards)
        .map(|s| ((s * per_shard) as u32..((s + 1) * per_shard) as u32).collect())
        .collect();
    let batches: Vec<ShardBatch> = data
        .iter()
        .zip(&ids)
        .enumerate()
        .map(|(s, (x, ids))| ShardBatch {
            shard: s as u32,
            x: x.view(),
            examples: ids,
        })
        .collect();
    let tree = ReductionTree::new(args.shards);

    let adam = OptimizerConfig::adam(1e-3);
    let mut params = engine.init_params();
    let mut state = adam.init_state(params.len());
    let mut sum = GradientSum::zeros(params.len());
    let mut epoch = 0u64;
    // Returns how long the gradient and the optimizer took inside the step. The pool's idle
    // threads spin, or sleep, between the step's parallel sections as a worker's do.
    let mut step = |params: &mut Vec<f32>| -> anyhow::Result<[Duration; 2]> {
        args.idle_threads.run(|| {
            let t = Instant::now();
            engine.node_gradient_into(params, epoch, &tree, tree.root(), &batches, &mut sum)?;
            epoch += 1; // fresh noise every step, as in training
            let gradient = t.elapsed();
            // The coordinator's part, as it does it: the optimizer divides the summed gradient
            // by the example count inside its own pass (no serial pass over the gradient first).
            adam.step_scaled(params, &sum.grad, sum.stats.examples as f32, &mut state)?;
            Ok([gradient, t.elapsed() - gradient])
        })
    };

    let (steps, elapsed, step_times, phases) = pool.install(|| -> anyhow::Result<_> {
        let warm = Instant::now();
        let mut warm_steps = 0;
        while warm.elapsed() < WARMUP || warm_steps < WARMUP_STEPS {
            step(&mut params)?;
            warm_steps += 1;
        }
        let budget = Duration::from_secs_f64(args.seconds);
        let start = Instant::now();
        let mut times = Vec::new();
        let mut phases = Vec::new();
        while start.elapsed() < budget {
            let t = Instant::now();
            let phase = step(&mut params)?;
            times.push(t.elapsed());
            phases.push(phase);
        }
        Ok((times.len(), start.elapsed(), times, phases))
    })?;
    if steps == 0 {
        bail!(
            "no step finished within --seconds {}: give it more time",
            args.seconds
        );
    }
    if params.iter().any(|p| !p.is_finite()) {
        bail!("parameters became non-finite during the benchmark");
    }
    let seconds = elapsed.as_secs_f64();
    say!(
        "bench: model={} {} batch={} threads={} shards={} steps={} seconds={:.2} samples/s={:.0}",
        model_name(&config),
        config.likelihood.name(),
        args.batch,
        args.threads,
        args.shards,
        steps,
        seconds,
        (steps * args.batch) as f64 / seconds
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let step = Spread::of(step_times);
    say!(
        "  step time: median {:.3} ms (10% {:.3}, 90% {:.3}), fastest {:.3} ms (= {:.0} samples/s)",
        ms(step.median),
        ms(step.p10),
        ms(step.p90),
        ms(step.fastest),
        args.batch as f64 / step.fastest.as_secs_f64()
    );

    // Inside the step, where the parts share caches and cores with each other (and with whatever
    // else the machine runs): the optimizer's median has measured several times its fastest
    // alone (docs/scaling.md §23).
    for (name, i) in [("gradient", 0), ("optimizer", 1)] {
        let t = Spread::of(phases.iter().map(|p| p[i]).collect());
        say!(
            "  in the step, {name}: median {:.3} ms (10% {:.3}, 90% {:.3})",
            ms(t.median),
            ms(t.p10),
            ms(t.p90)
        );
    }

    let parts = pool.install(|| {
        args.idle_threads
            .run(|| breakdown(&engine, &data, &ids, args, &params, &adam))
    });
    let step_ms = ms(step.median);
    say!(
        "  breakdown (each part timed alone, fastest of {PART_REPS}; median step {step_ms:.3} ms):"
    );
    for (name, t) in &parts {
        say!(
            "    {name:<40} {:>8.3} ms  {:>5.1}%",
            ms(*t),
            100.0 * ms(*t) / step_ms
        );
    }
    let accounted: f64 = parts.iter().map(|(_, t)| ms(*t)).sum();
    say!(
        "    {:<40} {:>8.3} ms  {:>5.1}%",
        "rest (tree sums, overhead)",
        step_ms - accounted,
        100.0 * (step_ms - accounted) / step_ms
    );
    if args.products {
        let times = pool.install(|| {
            args.idle_threads
                .run(|| time_products(engine.vae(), &params, per_shard, args.samples, args.shards))
        });
        say!(
            "  products (each alone, fastest of {PRODUCT_REPS}; ours on {} thread(s), \
             matrixmultiply one call on one):",
            args.threads
        );
        say!(
            "    {:<40} {:>16} {:>9} {:>15} {:>7}",
            "product",
            "m x k x n",
            "ours ms",
            "matrixmult. ms",
            "mm/ours"
        );
        for t in &times {
            let [m, k, n] = t.shape;
            say!(
                "    {:<40} {:>16} {:>9.3} {:>15.3} {:>6.2}x",
                t.name,
                format!("{m} x {k} x {n}"),
                ms(t.ours),
                ms(t.matrixmultiply),
                t.matrixmultiply.as_secs_f64() / t.ours.as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The fastest, 10th-percentile, median and 90th-percentile of some timings.
struct Spread {
    fastest: Duration,
    p10: Duration,
    median: Duration,
    p90: Duration,
}

impl Spread {
    /// # Panics
    /// If `times` is empty.
    fn of(mut times: Vec<Duration>) -> Self {
        times.sort();
        let at = |q: usize| times[times.len() * q / 100];
        Spread {
            fastest: times[0],
            p10: at(10),
            median: at(50),
            p90: at(90),
        }
    }
}

fn fastest(mut f: impl FnMut()) -> Duration {
    f();
    (0..PART_REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .expect("PART_REPS > 0")
}

/// Times the parts of a step alone, as the engine runs them: all shards' rows in one forward
/// pass, weight and bias gradients per shard, the rest of the backward pass on all rows.
fn breakdown(
    engine: &Engine,
    data: &[Array2<f32>],
    ids: &[Vec<u32>],
    args: &BenchArgs,
    params: &[f32],
    adam: &OptimizerConfig,
) -> Vec<(&'static str, Duration)> {
    let vae = engine.vae();
    let (k, z_dim) = (args.samples, args.latent);
    let per_shard = data[0].nrows();
    let n = per_shard * data.len();
    let views: Vec<ArrayView2<f32>> = data.iter().map(|x| x.view()).collect();
    let x = ndarray::concatenate(ndarray::Axis(0), &views).expect("same widths");
    let all_ids: Vec<u32> = ids.concat();
    let mut eps = vec![0.0f32; n * k * z_dim];
    let noise = fastest(|| fill_eps(engine.seed(), 0, &all_ids, 0, k, z_dim, &mut eps));
    let eps = ArrayView2::from_shape((n * k, z_dim), &eps[..]).expect("noise shape");
    let mut ws = Workspace::new();
    let forward = fastest(|| {
        vae.elbo(params, x.view(), eps, &mut ws)
            .expect("valid batch");
    });
    let sizes = vec![per_shard; data.len()];
    let root = ReductionTree::new(data.len()).root();
    let mut grad = vec![0.0f32; params.len()];
    let forward_backward = fastest(|| {
        vae.elbo_grad_tree(params, x.view(), eps, root, &sizes, &mut grad, &mut ws)
            .expect("valid batch");
    });
    let (fwd_gemm, bwd_gemm) = gemm_times(vae, params, per_shard, k, data.len());
    let mut p = params.to_vec();
    let mut state = adam.init_state(p.len());
    let grad = &grad;
    let optimizer = fastest(|| adam.step(&mut p, grad, &mut state).expect("sizes match"));
    let backward = forward_backward.saturating_sub(forward);
    vec![
        ("noise (keyed normals)", noise),
        ("forward GEMMs", fwd_gemm),
        (
            "forward elementwise (bias, act, loss)",
            forward.saturating_sub(fwd_gemm),
        ),
        ("backward GEMMs", bwd_gemm),
        (
            "backward elementwise (masks, sums)",
            backward.saturating_sub(bwd_gemm),
        ),
        ("optimizer (Adam)", optimizer),
    ]
}

/// The step's products with their exact shapes and operand layouts, on scratch buffers, as the
/// engine runs them for `shards` shards of `per_shard` examples with `k` samples: forward and
/// `delta W` products on all rows at once, weight gradients (`delta_s^T input_s` per shard, added
/// along the tree) by the fused tree kernel. Returns (forward, backward) times.
fn gemm_times(
    vae: &Vae,
    params: &[f32],
    per_shard: usize,
    k: usize,
    shards: usize,
) -> (Duration, Duration) {
    let layers = step_layers(vae.layout(), per_shard, k, shards);
    let widest = widest(&layers);
    let input = vec![0.5f32; widest];
    let mut output = vec![0.0f32; widest];
    let mut dweight = vec![0.0f32; params.len()];
    let tree = ReductionTree::new(shards);
    let w = |l: &common::model::LinearLayout| {
        ArrayView2::from_shape((l.out_dim, l.in_dim), &params[l.weight.clone()]).expect("weight")
    };
    let forward = fastest(|| {
        for &StepLayer { layer: l, rows, .. } in &layers {
            let a = ArrayView2::from_shape((rows, l.in_dim), &input[..rows * l.in_dim]);
            let c = ArrayViewMut2::from_shape((rows, l.out_dim), &mut output[..rows * l.out_dim]);
            gemm(1.0, a.expect("a"), w(l).t(), 0.0, c.expect("c"));
        }
    });
    let mut d_in = vec![0.0f32; widest];
    let backward = fastest(|| {
        for step_layer in &layers {
            let l = step_layer.layer;
            // dW = sum over shards s of delta_s^T input_s, along the tree, in one pass (the
            // engine's fused kernel)
            let program = step_layer.program(&tree);
            tree_weight_grad(
                &program,
                &input,
                l.out_dim,
                &output,
                l.in_dim,
                l.in_dim,
                &mut dweight[l.weight.clone()],
            );
            // d_in = delta W on all rows, except for layers fed by the data
            if !step_layer.fed_by_data {
                let all = step_layer.rows;
                let delta = ArrayView2::from_shape((all, l.out_dim), &input[..all * l.out_dim])
                    .expect("delta");
                let c = ArrayViewMut2::from_shape((all, l.in_dim), &mut d_in[..all * l.in_dim])
                    .expect("d_in");
                gemm(1.0, delta, w(l), 0.0, c);
            }
        }
    });
    (forward, backward)
}
