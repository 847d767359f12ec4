//! Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", Algorithm 1), with the
//! bias correction arranged as torch.optim.Adam does:
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

use rayon::prelude::*;

/// Adam's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// First and second moments, laid out like the parameters, and the step count t.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub t: u64,
}

impl AdamState {
    pub fn new(len: usize) -> Self {
        AdamState {
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
        }
    }
}

/// Elements per parallel task: large enough that scheduling is noise next to the work.
const CHUNK: usize = 1 << 14;

/// One Adam step over all parameters: advances t, updates m and v, moves params.
pub fn adam_step(params: &mut [f32], grads: &[f32], state: &mut AdamState, cfg: AdamConfig) {
    state.t += 1;
    let t = state.t as i32;
    let bc1 = 1.0 - (cfg.beta1 as f64).powi(t);
    let bc2 = 1.0 - (cfg.beta2 as f64).powi(t);
    let step_size = (cfg.lr as f64 / bc1) as f32;
    let inv_bc2_sqrt = (1.0 / bc2.sqrt()) as f32;
    let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
    params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(state.m.par_chunks_mut(CHUNK))
        .zip(state.v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let gi = g[i];
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                p[i] -= step_size * m[i] / (v[i].sqrt() * inv_bc2_sqrt + eps);
            }
        });
}

/// True when every value is finite; checked before a step is applied so a diverging run
/// keeps its last finite weights.
pub fn all_finite(values: &[f32]) -> bool {
    values
        .par_chunks(CHUNK)
        .all(|c| c.iter().fold(true, |ok, v| ok & v.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr() {
        // At t = 1 the bias-corrected update is lr * g / (|g| + eps'), about lr * sign(g).
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, -3.0];
        let mut s = AdamState::new(2);
        adam_step(&mut p, &g, &mut s, AdamConfig::default());
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
        assert!((p[1] - (-2.0 + 1e-3)).abs() < 1e-6);
        assert_eq!(s.t, 1);
    }
}
