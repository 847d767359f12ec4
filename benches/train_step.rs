//! Kernel and step micro-benchmarks (criterion), so a change to one kernel is measured in
//! isolation: the products of the canonical 784-400-20 model at B = 128, the fused passes,
//! Adam, and a whole training step, each on 1 and 2 threads.
//! Run: `cargo bench --no-default-features --bench train_step`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fastvae::first_layer::{self, sparse_weight_backward, BatchNonzeros, GradSink};
use fastvae::layers::{bce_logits_forward_backward, linear_forward};
use fastvae::matmul::{matmul, Op};
use fastvae::optim::{adam_step, all_finite, AdamConfig, AdamKernel, AdamState};
use fastvae::pool::{build as build_pool, keep_awake};
use fastvae::Config;
use fastvae::{Dataset, EpochSettings, Model};
use std::hint::black_box;

const B: usize = 128;

fn pseudo(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32 ^ seed).wrapping_mul(2_654_435_761) >> 8) as f32 / (1u32 << 24) as f32)
        .collect()
}

fn products(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.throughput(Throughput::Elements(B as u64));
    // (name, m, k, n, a layout, b layout): the big products of one step.
    let shapes = [
        ("fc1_forward x W1^T", B, 784, 400, Op::Plain, Op::Transposed),
        ("fc1_dweight dy^T x", 400, B, 784, Op::Transposed, Op::Plain),
        ("out_forward h W4^T", B, 400, 784, Op::Plain, Op::Transposed),
        ("out_dinp dy W4", B, 784, 400, Op::Plain, Op::Plain),
        ("out_dweight dy^T h", 784, B, 400, Op::Transposed, Op::Plain),
        // The latent block's products: narrow outputs (2Z = 40, Z = 20) from wide operands.
        ("head_forward h Wh^T", B, 400, 40, Op::Plain, Op::Transposed),
        ("dec0_dinp dy Wd0", B, 400, 20, Op::Plain, Op::Plain),
        ("dec0_dweight dy^T z", 400, B, 20, Op::Transposed, Op::Plain),
        // With a latent of 64: 64 columns, in groups of 16 on AVX2.
        ("dec0_dinp Z=64 dy Wd0", B, 400, 64, Op::Plain, Op::Plain),
        // The output layer's products with a hidden layer of 1024: rows of 4 KB.
        (
            "out_forward H=1024",
            B,
            1024,
            784,
            Op::Plain,
            Op::Transposed,
        ),
        ("out_dinp H=1024", B, 784, 1024, Op::Plain, Op::Plain),
        (
            "out_dweight H=1024",
            784,
            B,
            1024,
            Op::Transposed,
            Op::Plain,
        ),
    ];
    for threads in [1, 2] {
        let pool = build_pool(threads).unwrap();
        for &(name, m, k, n, la, lb) in &shapes {
            let a = pseudo(m * k, 1);
            let b = pseudo(k * n, 2);
            let mut d = vec![0.0; m * n];
            // The loop runs inside the pool: a product of 20-50 us would otherwise time the
            // hand-off to a sleeping worker as much as the product.
            g.bench_function(BenchmarkId::new(name, threads), |bench| {
                pool.install(|| bench.iter(|| matmul(&mut d, &a, la, &b, lb, m, k, n)))
            });
        }
    }
    g.finish();
}

fn passes(c: &mut Criterion) {
    let mut g = c.benchmark_group("passes");
    g.throughput(Throughput::Elements(B as u64));
    let pool = build_pool(2).unwrap();
    let x = pseudo(B * 784, 3);
    let w = pseudo(400 * 784, 4);
    let bias = pseudo(400, 5);
    let mut out = vec![0.0; B * 400];
    g.bench_function("linear_forward_relu 784->400", |bench| {
        bench.iter(|| {
            pool.install(|| {
                linear_forward(
                    &mut out,
                    &x,
                    &w,
                    &bias,
                    B,
                    784,
                    400,
                    Some(fastvae::Activation::Relu),
                )
            })
        })
    });
    let mut logits = pseudo(B * 784, 6);
    let mut loss = vec![0.0; B];
    g.bench_function("bce_logits B x 784", |bench| {
        bench.iter(|| {
            pool.install(|| bce_logits_forward_backward(&mut loss, &mut logits, &x, 784, true))
        })
    });
    let n = Config::mnist().param_count().unwrap();
    let mut p = pseudo(n, 7);
    let grads = pseudo(n, 8);
    let mut state = AdamState::new(n);
    g.bench_function("adam 652,824 params", |bench| {
        bench.iter(|| pool.install(|| adam_step(&mut p, &grads, &mut state, AdamConfig::default())))
    });
    // A batch gathered from 8-bit levels (MNIST's 60,000 rows), rows in a shuffled order.
    let levels: Vec<f32> = (0..60_000 * 784)
        .map(|k: usize| ((k * 2_654_435_761) >> 24 & 255) as f32 / 255.0)
        .collect();
    let images = Dataset::new(levels, 60_000, 784).unwrap();
    let rows: Vec<u32> = (0..B as u32)
        .map(|r| r.wrapping_mul(7919) % 60_000)
        .collect();
    let mut xb = vec![0.0f32; B * 784];
    g.bench_function("gather a batch of 8-bit levels", |bench| {
        bench.iter(|| pool.install(|| fastvae::dataset::gather(&mut xb, &images, &rows)))
    });
    // A step's finiteness check reads about 150,000 values (two activations and the small
    // layers' gradients): here as many, in one slice.
    g.bench_function("finiteness check of 153,600 values", |bench| {
        bench.iter(|| pool.install(|| all_finite(black_box(&grads[..153_600]))))
    });

    // The first layer on a batch with MNIST's share of zeros (about 81%).
    let xs: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(k, &v)| if (k * 7919) % 100 < 81 { 0.0 } else { v })
        .collect();
    let mut cols = BatchNonzeros::default();
    // Indexed here too, so the cases below run when a filter leaves out the indexing case.
    pool.install(|| cols.build(&xs, B, 784, 2));
    let wt = pseudo(784 * 400, 10);
    g.bench_function("first layer: index the batch's nonzeros", |bench| {
        bench.iter(|| pool.install(|| cols.build(&xs, B, 784, 2)))
    });
    g.bench_function("first layer: sparse forward", |bench| {
        bench.iter(|| {
            let cols = cols.get();
            let relu = fastvae::Activation::Relu;
            pool.install(|| {
                first_layer::forward(&mut out, &xs, cols, &wt, &bias, B, 784, 400, relu)
            })
        })
    });
    let dh = pseudo(B * 400, 11);
    let mut dwt = vec![0.0; 784 * 400];
    g.bench_function("first layer: sparse weight gradient", |bench| {
        bench.iter(|| {
            let cols = cols.get().expect("indexed");
            pool.install(|| sparse_weight_backward(GradSink::Store(&mut dwt), cols, &dh, 784, 400))
        })
    });
    // The same with MNIST's layout of zeros: dense at the centre of the 28 x 28 image and
    // empty at its borders (about 19% nonzeros, a third of the columns nonzero in a third of
    // the rows or more), where the densest columns take a dense product.
    let xm: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(k, &v)| {
            let (r, c) = ((k % 784) / 28, k % 28);
            let dist = ((r as f32 - 13.5).powi(2) + (c as f32 - 13.5).powi(2)).sqrt();
            if v < 0.85 - 0.075 * dist {
                v + 0.01
            } else {
                0.0
            }
        })
        .collect();
    // Or a real batch: FASTVAE_BENCH_BATCH names a file of B x 784 little-endian float32
    // (128 MNIST images, say), for the kernels whose speed depends on where the zeros are.
    let xm = match std::env::var_os("FASTVAE_BENCH_BATCH") {
        Some(path) => {
            let bytes = std::fs::read(path).expect("FASTVAE_BENCH_BATCH is readable");
            assert_eq!(
                bytes.len(),
                B * 784 * 4,
                "FASTVAE_BENCH_BATCH holds B x 784 float32"
            );
            let floats = bytes.chunks_exact(4);
            floats
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        }
        None => xm,
    };
    let mut cols_m = BatchNonzeros::default();
    pool.install(|| cols_m.build(&xm, B, 784, 2));
    // 1024 outputs: rows of 4 KB, which land in the same L1 sets.
    let (wt_wide, bias_wide) = (pseudo(784 * 1024, 12), pseudo(1024, 13));
    let mut out_wide = vec![0.0f32; B * 1024];
    g.bench_function(
        "first layer: sparse forward, MNIST's zeros, 1024 outputs",
        |bench| {
            bench.iter(|| {
                let cols = cols_m.get();
                let relu = fastvae::Activation::Relu;
                let (w, b, out) = (&wt_wide, &bias_wide, &mut out_wide);
                pool.install(|| first_layer::forward(out, &xm, cols, w, b, B, 784, 1024, relu))
            })
        },
    );
    g.bench_function("first layer: sparse forward, MNIST's zeros", |bench| {
        bench.iter(|| {
            let cols = cols_m.get();
            let relu = fastvae::Activation::Relu;
            pool.install(|| {
                first_layer::forward(&mut out, &xm, cols, &wt, &bias, B, 784, 400, relu)
            })
        })
    });
    // The weight gradient alone (into a buffer) with 1024 outputs, as above.
    let dh_wide = pseudo(B * 1024, 14);
    let mut dwt_wide = vec![0.0f32; 784 * 1024];
    g.bench_function(
        "first layer: sparse weight gradient, MNIST's zeros, 1024 outputs",
        |bench| {
            bench.iter(|| {
                let cols = cols_m.get().expect("indexed");
                let sink = GradSink::Store(&mut dwt_wide);
                pool.install(|| sparse_weight_backward(sink, cols, &dh_wide, 784, 1024))
            })
        },
    );
    // Fused with Adam, as training runs it: on 1 and 2 threads, the pool's workers kept
    // polling (`keep_awake`) as they are through a training step.
    for threads in [1, 2] {
        let pool = build_pool(threads).unwrap();
        for (zeros, cols) in [("uniform zeros", &cols), ("MNIST's zeros", &cols_m)] {
            let (mut wt1, mut m1, mut v1) =
                (wt.clone(), vec![0.0; 784 * 400], vec![0.0; 784 * 400]);
            let name = format!("first layer: sparse weight gradient fused with Adam, {zeros}");
            g.bench_function(BenchmarkId::new(name, threads), |bench| {
                bench.iter(|| {
                    let cols = cols.get().expect("indexed");
                    let sink = GradSink::Adam {
                        wt: &mut wt1,
                        m: &mut m1,
                        v: &mut v1,
                        kernel: AdamKernel::new(1, AdamConfig::default()),
                    };
                    pool.install(|| {
                        keep_awake(|| sparse_weight_backward(sink, cols, &dh, 784, 400))
                    })
                })
            });
        }
    }
    g.finish();
}

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step");
    g.throughput(Throughput::Elements(B as u64));
    g.sample_size(30);
    let n_rows = 4096;
    let data = Dataset::new(pseudo(n_rows * 784, 9), n_rows, 784).unwrap();
    // k = 1: the ELBO step; k = 5: the importance-weighted step (the decoder over 5 B rows).
    for (k, threads) in [(1, 1), (1, 2), (5, 1), (5, 2)] {
        let mut model = Model::new(Config::mnist(), 0, threads).unwrap();
        let settings = EpochSettings {
            batch_size: B,
            samples: k,
            ..EpochSettings::default()
        };
        let name = if k == 1 {
            "mnist 784-400-20 B=128".to_string()
        } else {
            format!("mnist 784-400-20 B=128 iwae k={k}")
        };
        g.bench_function(BenchmarkId::new(name, threads), |bench| {
            let mut run = model.begin_epoch(data.n, settings).unwrap();
            bench.iter(|| {
                if run.done() {
                    run = model.begin_epoch(data.n, settings).unwrap();
                }
                model.run(&data, &mut run, 1).unwrap();
                black_box(run.loss_sum)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, products, passes, step);
criterion_main!(benches);
