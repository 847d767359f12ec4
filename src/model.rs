//! The VAE's forward and backward passes over a batch, composed from `layers` and
//! `first_layer`. Weights only: the optimizer and the step are in `step`.
//!
//! Forward: x (B, D) -> encoder (B, h1) ... (B, hk) -> head (B, 2Z) = [mu | logvar]
//! -> z = mu + exp(logvar / 2) eps (B, Z) -> decoder (B, hk) ... (B, h1) -> out (B, D): the
//! logits of Bernoulli pixels, or the means of Gaussians with learned per-feature
//! log-variances. Loss per example: -log p(x|z) (summed over D) + beta KL(q(z|x) || N(0, I)),
//! with beta = 1 (the negative ELBO) unless training weights the KL otherwise.
//!
//! The passes run in three stretches: the encoder's hidden layers (the first through
//! `first_layer`), the latent block (the head, the reparameterization and the decoder's first
//! hidden layer, if any) by parts of rows, and the rest of the decoder.

use crate::config::{Activation, Config};
use crate::first_layer::{self, BatchNonzeros};
use crate::layers::{
    activation_backward, activation_backward_rows, bce_logits_forward_backward, bias_backward,
    gaussian_logvar_backward, gaussian_nll_forward_backward, linear_backward, linear_forward,
    linear_forward_on, reparam_kl_backward, reparam_kl_forward,
};
use crate::matmul::{matmul_on, Op};
use crate::params::{LinearLayout, ParamLayout};
use crate::phases::{Phase, Timer};
use rayon::prelude::*;

/// Rows per part at least for the latent block to run by parts (`Vae::latent_parts`).
const LATENT_MIN_ROWS: usize = 16;

/// Architecture and weights; no optimizer state.
#[derive(Debug, Clone)]
pub struct Vae {
    pub config: Config,
    pub layout: ParamLayout,
    /// All weights and biases, laid out by `layout`.
    pub params: Vec<f32>,
}

/// Every activation and activation-gradient buffer for batches of up to `cap` rows, allocated
/// once and reused by every step.
#[derive(Debug)]
pub struct Workspace {
    pub cap: usize,
    /// Parts the batch is split into where the split changes how sums round (the latent
    /// block, the first layer's index): the model's thread count, whatever pool runs the
    /// work, so that results do not depend on which pool that is.
    pub parts: usize,
    /// (B, D) the batch.
    pub x: Vec<f32>,
    /// (B, Z) the reparameterization noise.
    pub eps: Vec<f32>,
    /// Per encoder layer, (B, h_i) after its activation.
    pub enc: Vec<Vec<f32>>,
    /// (B, 2Z) [mu | logvar].
    pub head: Vec<f32>,
    /// (B, Z) the latent sample.
    pub z: Vec<f32>,
    /// Per decoder layer, (B, width) after its activation; the last is the logits (B, D),
    /// overwritten by their gradient in the backward pass.
    pub dec: Vec<Vec<f32>>,
    /// (B) per-example -log p(x|z) and KL.
    pub bce: Vec<f64>,
    /// The KL term's weight in the loss and its gradient (beta; 1 for the ELBO).
    pub kl_weight: f32,
    pub kl: Vec<f64>,
    /// Gradients with respect to `enc`, `head`, `z` and the decoder's hidden layers.
    pub denc: Vec<Vec<f32>>,
    pub dhead: Vec<f32>,
    pub dz: Vec<f32>,
    pub ddec: Vec<Vec<f32>>,
    /// The batch's nonzeros by row and by input column, when the first layer runs sparse.
    pub nonzeros: BatchNonzeros,
    /// The weight gradients of the latent block of every part but the first (which goes
    /// straight into the gradients), (parts - 1, latent span).
    pub latent_grads: Vec<f32>,
    /// The k-sample objectives (`iwae`): (B k, D) each row of x once per sample, and (B k) each
    /// sample's weight in the gradient; sized on first use.
    pub x_rep: Vec<f32>,
    pub sample_weights: Vec<f32>,
}

/// What `Vae::backward` does with the first layer's weight gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstWeight {
    /// Compute it into the gradients.
    Compute,
    /// Leave it for the caller (`first_layer::sparse_weight_backward` fused with Adam):
    /// `ws.denc[0]` holds the gradient it comes from.
    Defer,
}

impl Workspace {
    /// Buffers for batches of up to `cap` rows of a model with `threads` threads.
    pub fn new(config: &Config, cap: usize, with_grads: bool, threads: usize) -> Self {
        let z = config.latent_dim;
        let buf = |w: usize| vec![0.0f32; cap * w];
        let enc: Vec<_> = config.hidden_dims.iter().map(|&h| buf(h)).collect();
        let dec: Vec<_> = config.decoder_dims()[1..].iter().map(|&w| buf(w)).collect();
        let grad = |w: usize| if with_grads { buf(w) } else { Vec::new() };
        Workspace {
            cap,
            parts: threads.max(1),
            x: buf(config.input_dim),
            eps: buf(z),
            denc: config.hidden_dims.iter().map(|&h| grad(h)).collect(),
            ddec: config.hidden_dims.iter().rev().map(|&h| grad(h)).collect(),
            enc,
            head: buf(2 * z),
            z: buf(z),
            dec,
            bce: vec![0.0; cap],
            kl_weight: 1.0,
            kl: vec![0.0; cap],
            dhead: grad(2 * z),
            dz: grad(z),
            nonzeros: BatchNonzeros::default(),
            latent_grads: Vec::new(),
            x_rep: Vec::new(),
            sample_weights: Vec::new(),
        }
    }
}

pub(crate) fn weights<'a>(params: &'a [f32], l: &LinearLayout) -> (&'a [f32], &'a [f32]) {
    (&params[l.weight.clone()], &params[l.bias.clone()])
}

pub(crate) fn weight_grads<'a>(
    grads: &'a mut [f32],
    l: &LinearLayout,
) -> (&'a mut [f32], &'a mut [f32]) {
    grads[l.weight.start..l.bias.end].split_at_mut(l.weight.len())
}

/// One part's rows of the latent block's forward buffers.
struct LatentForwardPart<'a> {
    /// (r, hk) the last encoder activations, or x without hidden layers.
    inp: &'a [f32],
    /// (r, Z) the noise.
    eps: &'a [f32],
    /// (r, 2Z), (r, Z), (r) written.
    head: &'a mut [f32],
    z: &'a mut [f32],
    kl: &'a mut [f64],
    /// (r, hk) the first decoder layer's activations, when the block holds that layer.
    dec0: Option<&'a mut [f32]>,
}

/// One part's rows of the latent block's backward buffers, and its weight gradients (the
/// head's, then the first decoder layer's when the block holds it: one range).
struct LatentBackwardPart<'a> {
    grads: &'a mut [f32],
    head: &'a [f32],
    eps: &'a [f32],
    z: &'a [f32],
    inp: &'a [f32],
    /// (r, hk) the first decoder layer's activations and their gradient, when in the block.
    dec0: Option<(&'a [f32], &'a mut [f32])>,
    /// (r, Z): from the first decoder layer here, or the output layer's input gradient.
    dz: &'a mut [f32],
    dhead: &'a mut [f32],
    /// (r, hk) the last encoder activations' gradient (none without hidden layers).
    dinp: Option<&'a mut [f32]>,
}

impl Vae {
    pub fn new(config: Config, seed: u64) -> Self {
        let layout = ParamLayout::new(&config);
        let params = layout.init(seed);
        Vae {
            config,
            layout,
            params,
        }
    }

    fn act(&self) -> Activation {
        self.config.activation
    }

    /// ws.x[..n] -> ws.head[..n] = [mu | logvar], q(z|x) alone (encoding and the
    /// importance-weighted estimate).
    pub fn encode_forward(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        self.encode_hidden(ws, n, sparse);
        let h = &self.layout.head;
        let inp = match self.layout.encoder.len() {
            0 => &ws.x[..n * h.in_dim],
            k => &ws.enc[k - 1][..n * h.in_dim],
        };
        let (w, b) = weights(&self.params, h);
        let head = &mut ws.head[..n * h.out_dim];
        linear_forward(head, inp, w, b, n, h.in_dim, h.out_dim, None);
    }

    /// The encoder's hidden layers: ws.x[..n] -> ws.enc, the first through `first_layer`.
    /// With `sparse`, the batch's nonzeros are indexed (in ws.nonzeros) and the first layer
    /// skips zero inputs, here and in the weight gradient.
    pub(crate) fn encode_hidden(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        let p = &self.params;
        let mut inp: &[f32] = &ws.x[..n * self.config.input_dim];
        ws.nonzeros.clear();
        for (i, (l, out)) in self
            .layout
            .encoder
            .iter()
            .zip(ws.enc.iter_mut())
            .enumerate()
        {
            let (w, b) = weights(p, l);
            let out = &mut out[..n * l.out_dim];
            if i == 0 {
                if sparse {
                    ws.nonzeros.build(inp, n, l.in_dim, ws.parts);
                }
                let nz = ws.nonzeros.get();
                first_layer::forward(out, inp, nz, w, b, n, l.in_dim, l.out_dim, self.act());
            } else {
                linear_forward(out, inp, w, b, n, l.in_dim, l.out_dim, Some(self.act()));
            }
            inp = out;
        }
    }

    /// Whether the latent block holds the decoder's first layer (it has a hidden layer).
    pub(crate) fn latent_has_dec0(&self) -> bool {
        self.layout.decoder.len() >= 2
    }

    /// Parts of rows for the latent block: one per thread of the model (ws.parts), each of at
    /// least LATENT_MIN_ROWS.
    fn latent_parts(ws: &Workspace, n: usize) -> usize {
        ws.parts.min(n / LATENT_MIN_ROWS).max(1)
    }

    /// The head, the reparameterization with the KL, and the first decoder layer, by parts of
    /// rows in parallel, each part's products on one thread: their 2Z- and Z-wide sides are
    /// too narrow to split each product well, and a part's rows stay with its thread from the
    /// last encoder activations to the first decoder ones.
    fn latent_forward(&self, ws: &mut Workspace, n: usize) {
        let (zd, act, p) = (self.config.latent_dim, self.act(), &self.params);
        let h = &self.layout.head;
        let (wh, bh) = weights(p, h);
        let rows = n.div_ceil(Self::latent_parts(ws, n));
        let inp = match self.layout.encoder.len() {
            0 => &ws.x[..n * h.in_dim],
            k => &ws.enc[k - 1][..n * h.in_dim],
        };
        let d0 = self.latent_has_dec0().then(|| &self.layout.decoder[0]);
        let mut dec0 = match d0 {
            Some(d0) => Some(ws.dec[0][..n * d0.out_dim].chunks_mut(rows * d0.out_dim)),
            None => None,
        };
        let mut inp = inp.chunks(rows * h.in_dim);
        let mut eps = ws.eps[..n * zd].chunks(rows * zd);
        let mut head = ws.head[..n * 2 * zd].chunks_mut(rows * 2 * zd);
        let mut z = ws.z[..n * zd].chunks_mut(rows * zd);
        let parts: Vec<_> = ws.kl[..n]
            .chunks_mut(rows)
            .map(|kl| LatentForwardPart {
                inp: inp.next().expect("one chunk per part"),
                eps: eps.next().expect("one chunk per part"),
                head: head.next().expect("one chunk per part"),
                z: z.next().expect("one chunk per part"),
                kl,
                dec0: dec0.as_mut().map(|c| c.next().expect("one chunk per part")),
            })
            .collect();
        parts.into_par_iter().for_each(|part| {
            let r = part.kl.len();
            linear_forward_on(1, part.head, part.inp, wh, bh, r, h.in_dim, h.out_dim, None);
            reparam_kl_forward(part.z, part.kl, part.head, part.eps, zd);
            if let (Some(out), Some(d0)) = (part.dec0, d0) {
                let (wd, bd) = weights(p, d0);
                linear_forward_on(1, out, part.z, wd, bd, r, zd, d0.out_dim, Some(act));
            }
        });
    }

    /// The decoder from its layer `first` on, that layer's input in place (ws.z for layer 0).
    pub(crate) fn decode_from(&self, ws: &mut Workspace, n: usize, first: usize) {
        let p = &self.params;
        let last = self.layout.decoder.len() - 1;
        let (done, mut rest) = ws.dec.split_at_mut(first);
        let mut prev: &[f32] = match done.last() {
            Some(d) => d,
            None => &ws.z[..],
        };
        for (j, l) in self.layout.decoder.iter().enumerate().skip(first) {
            let (out, tail) = rest
                .split_first_mut()
                .expect("one buffer per decoder layer");
            let (w, b) = weights(p, l);
            let act = (j < last).then_some(self.act());
            let out = &mut out[..n * l.out_dim];
            let inp = &prev[..n * l.in_dim];
            linear_forward(out, inp, w, b, n, l.in_dim, l.out_dim, act);
            prev = out;
            rest = tail;
        }
    }

    /// ws.z[..n] -> logits in ws.dec.last()[..n].
    pub fn decode_forward(&self, ws: &mut Workspace, n: usize) {
        self.decode_from(ws, n, 0);
    }

    /// The full forward pass for n rows given ws.x and ws.eps: ws.kl and the logits in
    /// ws.dec.last().
    pub fn forward(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        let t = Timer::start();
        self.encode_hidden(ws, n, sparse);
        t.stop(Phase::FirstForward);
        let t = Timer::start();
        self.latent_forward(ws, n);
        t.stop(Phase::LatentForward);
        let t = Timer::start();
        self.decode_from(ws, n, usize::from(self.latent_has_dec0()));
        t.stop(Phase::DecoderForward);
    }

    /// Per-example -log p(x|z) into ws.bce; with `grad`, the decoder's outputs (logits or
    /// Gaussian means) become their gradient.
    pub fn reconstruction_loss(&self, ws: &mut Workspace, n: usize, grad: bool) {
        let d = self.config.input_dim;
        let out = ws.dec.last_mut().expect("decoder has an output layer");
        let (loss, out, x) = (&mut ws.bce[..n], &mut out[..n * d], &ws.x[..n * d]);
        match &self.layout.out_logvar {
            None => bce_logits_forward_backward(loss, out, x, d, grad),
            Some(lv) => {
                gaussian_nll_forward_backward(loss, out, x, &self.params[lv.clone()], d, grad)
            }
        }
    }

    /// After `forward`: the loss summed over the n rows (-log p(x|z) + beta KL, beta being
    /// ws.kl_weight), the decoder's outputs turned into their gradient for `backward`.
    pub fn loss(&self, ws: &mut Workspace, n: usize) -> f64 {
        self.reconstruction_loss(ws, n, true);
        let kl: f64 = ws.kl[..n].iter().sum();
        let kl = if ws.kl_weight == 1.0 {
            kl
        } else {
            ws.kl_weight as f64 * kl
        };
        ws.bce[..n].iter().sum::<f64>() + kl
    }

    /// After `loss`: the gradient of the loss with respect to every parameter, written into
    /// `grads` (laid out as the parameters); `first` says whether the first layer's weight
    /// gradient is computed or left to the caller.
    pub fn backward(&self, grads: &mut [f32], ws: &mut Workspace, n: usize, first: FirstWeight) {
        debug_assert_eq!(grads.len(), self.params.len());
        if let Some(lv) = &self.layout.out_logvar {
            let dm = ws.dec.last().expect("decoder has an output layer");
            let (g, p) = (&mut grads[lv.clone()], &self.params[lv.clone()]);
            gaussian_logvar_backward(g, dm, p, n, None);
        }
        let t = Timer::start();
        self.decoder_backward(grads, ws, n, usize::from(self.latent_has_dec0()));
        t.stop(Phase::DecoderBackward);
        let t = Timer::start();
        self.latent_backward(grads, ws, n);
        t.stop(Phase::LatentBackward);
        let t = Timer::start();
        self.encoder_backward(grads, ws, n, first);
        t.stop(Phase::EncoderBackward);
    }

    /// The decoder's layers from `first` on, last first: from the logits' gradient to
    /// ws.ddec[first - 1] (or ws.dz when `first` is 0). The gradient of layer j's output is the
    /// logits' for the last layer, ddec[j] made pre-activation for the others. The Gaussian
    /// log-variances' gradient is the caller's.
    pub(crate) fn decoder_backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        first: usize,
    ) {
        let (act, params) = (self.act(), &self.params);
        let layers = &self.layout.decoder;
        for j in (first..layers.len()).rev() {
            let l = &layers[j];
            let (dw, db) = weight_grads(grads, l);
            let (w, _) = weights(params, l);
            let (dec_before, dec_from_j) = ws.dec.split_at_mut(j);
            let (ddec_before, ddec_from_j) = ws.ddec.split_at_mut(j);
            let dout: &[f32] = if j + 1 == layers.len() {
                &dec_from_j[0][..n * l.out_dim]
            } else {
                let d = &mut ddec_from_j[0][..n * l.out_dim];
                activation_backward(d, &dec_from_j[0][..n * l.out_dim], l.out_dim, act);
                d
            };
            let (inp, dinp): (&[f32], &mut [f32]) = if j == 0 {
                (&ws.z[..n * l.in_dim], &mut ws.dz[..n * l.in_dim])
            } else {
                (
                    &dec_before[j - 1][..n * l.in_dim],
                    &mut ddec_before[j - 1][..n * l.in_dim],
                )
            };
            linear_backward(Some(dinp), dw, db, dout, inp, w, n, l.in_dim, l.out_dim);
        }
    }

    /// The backward pass of `latent_forward`, by the same parts: to the gradient of the last
    /// encoder activations (ws.denc), with the head's and the first decoder layer's weight
    /// gradients summed over the parts in part order.
    fn latent_backward(&self, grads: &mut [f32], ws: &mut Workspace, n: usize) {
        let (zd, act, p) = (self.config.latent_dim, self.act(), &self.params);
        let beta = ws.kl_weight;
        let h = &self.layout.head;
        let d0 = self.latent_has_dec0().then(|| &self.layout.decoder[0]);
        let h1 = h.in_dim;
        let rows = n.div_ceil(Self::latent_parts(ws, n));
        // The head's parameters, then the first decoder layer's, are one range.
        let span = h.weight.start..d0.map_or(h.bias.end, |d0| d0.bias.end);
        debug_assert!(d0.is_none_or(|d0| h.bias.end == d0.weight.start));
        let len = span.len();
        let count = n.div_ceil(rows);
        let extra = (count - 1) * len;
        if ws.latent_grads.len() < extra {
            ws.latent_grads.resize(extra, 0.0);
        }
        let k = self.layout.encoder.len();
        let inp = match k {
            0 => &ws.x[..n * h1],
            k => &ws.enc[k - 1][..n * h1],
        };
        let mut dinp = ws
            .denc
            .last_mut()
            .map(|d| d[..n * h1].chunks_mut(rows * h1));
        let mut dec0 = match d0 {
            Some(d0) => {
                let w = d0.out_dim;
                let (dec, ddec) = (&ws.dec[0][..n * w], &mut ws.ddec[0][..n * w]);
                Some(dec.chunks(rows * w).zip(ddec.chunks_mut(rows * w)))
            }
            None => None,
        };
        let mut inp = inp.chunks(rows * h1);
        let mut head = ws.head[..n * 2 * zd].chunks(rows * 2 * zd);
        let mut eps = ws.eps[..n * zd].chunks(rows * zd);
        let mut z = ws.z[..n * zd].chunks(rows * zd);
        let mut dz = ws.dz[..n * zd].chunks_mut(rows * zd);
        let mut dhead = ws.dhead[..n * 2 * zd].chunks_mut(rows * 2 * zd);
        let part_grads = std::iter::once(&mut grads[span.clone()])
            .chain(ws.latent_grads[..extra].chunks_mut(len));
        let work: Vec<_> = part_grads
            .map(|g| LatentBackwardPart {
                grads: g,
                head: head.next().expect("one chunk per part"),
                eps: eps.next().expect("one chunk per part"),
                z: z.next().expect("one chunk per part"),
                inp: inp.next().expect("one chunk per part"),
                dec0: dec0.as_mut().map(|c| c.next().expect("one chunk per part")),
                dz: dz.next().expect("one chunk per part"),
                dhead: dhead.next().expect("one chunk per part"),
                dinp: dinp.as_mut().map(|c| c.next().expect("one chunk per part")),
            })
            .collect();
        work.into_par_iter().for_each(|part| {
            let r = part.eps.len() / zd;
            let (gh, gd) = part.grads.split_at_mut(h.bias.end - h.weight.start);
            let (gh_w, gh_b) = gh.split_at_mut(h.weight.len());
            let (plain, transposed) = (Op::Plain, Op::Transposed);
            if let (Some((dec, ddec)), Some(d0)) = (part.dec0, d0) {
                let (wd, hd) = (weights(p, d0).0, d0.out_dim);
                let (gd_w, gd_b) = gd.split_at_mut(d0.weight.len());
                activation_backward_rows(ddec, dec, act);
                matmul_on(1, part.dz, ddec, plain, wd, plain, r, hd, zd, None);
                matmul_on(1, gd_w, ddec, transposed, part.z, plain, hd, r, zd, None);
                bias_backward(gd_b, ddec, r, hd);
            }
            reparam_kl_backward(part.dhead, part.dz, part.head, part.eps, zd, beta);
            let wh = weights(p, h).0;
            if let Some(dinp) = part.dinp {
                matmul_on(1, dinp, part.dhead, plain, wh, plain, r, 2 * zd, h1, None);
            }
            matmul_on(
                1,
                gh_w,
                part.dhead,
                transposed,
                part.inp,
                plain,
                2 * zd,
                r,
                h1,
                None,
            );
            bias_backward(gh_b, part.dhead, r, 2 * zd);
        });
        let out = &mut grads[span];
        for part in ws.latent_grads[..extra].chunks_exact(len) {
            out.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
    }

    /// The encoder's layers, last first; the first layer through `first_layer`, whose input
    /// gradient is never needed.
    pub(crate) fn encoder_backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        first: FirstWeight,
    ) {
        let (act, params) = (self.act(), &self.params);
        for (i, l) in self.layout.encoder.iter().enumerate().rev() {
            let (dw, db) = weight_grads(grads, l);
            let (denc_before, denc_from_i) = ws.denc.split_at_mut(i);
            let dout = &mut denc_from_i[0][..n * l.out_dim];
            activation_backward(dout, &ws.enc[i][..n * l.out_dim], l.out_dim, act);
            if i == 0 {
                bias_backward(db, dout, n, l.out_dim);
            } else {
                let (w, _) = weights(params, l);
                let inp = &ws.enc[i - 1][..n * l.in_dim];
                let dinp = &mut denc_before[i - 1][..n * l.in_dim];
                linear_backward(Some(dinp), dw, db, dout, inp, w, n, l.in_dim, l.out_dim);
            }
        }
        if first == FirstWeight::Compute && !self.layout.encoder.is_empty() {
            self.first_weight_backward(grads, ws, n);
        }
    }

    /// The first layer's weight gradient into `grads`, from `ws.denc[0]` once `backward` made it
    /// pre-activation (in `backward` itself, or after `backward(.., FirstWeight::Defer)`).
    pub fn first_weight_backward(&self, grads: &mut [f32], ws: &Workspace, n: usize) {
        let l = &self.layout.encoder[0];
        let (dw, _) = weight_grads(grads, l);
        let (x, nz) = (&ws.x[..n * l.in_dim], ws.nonzeros.get());
        let dh = &ws.denc[0][..n * l.out_dim];
        first_layer::weight_backward(dw, x, nz, dh, n, l.in_dim, l.out_dim);
    }
}
