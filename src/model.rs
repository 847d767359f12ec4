//! The VAE's forward and backward passes over a batch, composed from `layers`.
//!
//! Forward: x (B, D) -> encoder (B, h1) ... (B, hk) -> head (B, 2Z) = [mu | logvar]
//! -> z = mu + exp(logvar / 2) eps (B, Z) -> decoder (B, hk) ... (B, h1) -> logits (B, D).
//! Loss per example: -log p(x|z) (Bernoulli, summed over D) + KL(q(z|x) || N(0, I)).

use crate::config::{Activation, Config};
use crate::layers::{
    activation_backward, activation_backward_rows, bce_logits_forward_backward, bias_backward,
    linear_backward, linear_forward, linear_forward_on, matmul, matmul_on, reparam_kl_backward,
    reparam_kl_forward, Layout as MatLayout,
};
use crate::params::{Layout, LinearLayout};
use crate::sparse::{first_layer_forward, first_layer_weight_grad, BatchColumns, GradSink};
use rayon::prelude::*;

/// Rows per part at least for the latent block to run by parts (`Vae::latent_forward`).
const LATENT_MIN_ROWS: usize = 16;

/// Architecture and weights; no optimizer state.
#[derive(Debug, Clone)]
pub struct Vae {
    pub config: Config,
    pub layout: Layout,
    /// All weights and biases, laid out by `layout`.
    pub params: Vec<f32>,
}

/// Every activation and activation-gradient buffer for batches of up to `cap` rows, allocated
/// once and reused by every step.
#[derive(Debug)]
pub struct Workspace {
    pub cap: usize,
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
    pub kl: Vec<f64>,
    /// Gradients with respect to `enc`, `head`, `z` and the decoder's hidden layers.
    pub denc: Vec<Vec<f32>>,
    pub dhead: Vec<f32>,
    pub dz: Vec<f32>,
    pub ddec: Vec<Vec<f32>>,
    /// The batch's nonzeros by row and by input column, when the first layer runs sparse.
    pub cols: BatchColumns,
    /// Each part's gradients of the head and the first decoder layer in `latent_backward`.
    pub latent: Vec<f32>,
}

/// What `loss_backward` does with the first layer's weight gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstWeight {
    /// Compute it into the gradients.
    Compute,
    /// Leave it for the caller (`first_layer_weight_grad`, or fused with Adam): ws.denc[0]
    /// holds the gradient it comes from.
    Defer,
}

impl Workspace {
    pub fn new(config: &Config, cap: usize, with_grads: bool) -> Self {
        let z = config.latent_dim;
        let buf = |w: usize| vec![0.0f32; cap * w];
        let enc: Vec<_> = config.hidden_dims.iter().map(|&h| buf(h)).collect();
        let dec: Vec<_> = config.decoder_dims()[1..].iter().map(|&w| buf(w)).collect();
        let grad = |w: usize| if with_grads { buf(w) } else { Vec::new() };
        Workspace {
            cap,
            x: buf(config.input_dim),
            eps: buf(z),
            denc: config.hidden_dims.iter().map(|&h| grad(h)).collect(),
            ddec: config.hidden_dims.iter().rev().map(|&h| grad(h)).collect(),
            enc,
            head: buf(2 * z),
            z: buf(z),
            dec,
            bce: vec![0.0; cap],
            kl: vec![0.0; cap],
            dhead: grad(2 * z),
            dz: grad(z),
            cols: BatchColumns::default(),
            latent: Vec::new(),
        }
    }
}

fn weights<'a>(params: &'a [f32], l: &LinearLayout) -> (&'a [f32], &'a [f32]) {
    (&params[l.weight.clone()], &params[l.bias.clone()])
}

fn weight_grads<'a>(grads: &'a mut [f32], l: &LinearLayout) -> (&'a mut [f32], &'a mut [f32]) {
    grads[l.weight.start..l.bias.end].split_at_mut(l.weight.len())
}

impl Vae {
    pub fn new(config: Config, seed: u64) -> Self {
        let layout = Layout::new(&config);
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

    /// ws.x[..n] -> ws.head[..n] = [mu | logvar].
    /// With `sparse`, the batch's nonzeros are indexed (in ws.cols) and the first layer skips
    /// zero inputs, here and in the weight gradient.
    pub fn encode_forward(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        self.encode_hidden(ws, n, sparse);
        self.head_forward(ws, n);
    }

    /// The encoder's hidden layers: ws.x[..n] -> ws.enc.
    fn encode_hidden(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        let p = &self.params;
        let mut inp: &[f32] = &ws.x[..n * self.config.input_dim];
        ws.cols.clear();
        for (l, out) in self.layout.encoder.iter().zip(ws.enc.iter_mut()) {
            let (w, b) = weights(p, l);
            let out = &mut out[..n * l.out_dim];
            if l.transposed {
                if sparse {
                    ws.cols.build(inp, n, l.in_dim);
                }
                let cols = ws.cols.get();
                first_layer_forward(out, inp, cols, w, b, n, l.in_dim, l.out_dim, self.act());
            } else {
                linear_forward(out, inp, w, b, n, l.in_dim, l.out_dim, Some(self.act()));
            }
            inp = out;
        }
    }

    /// The last encoder activations (or x) -> ws.head = [mu | logvar].
    fn head_forward(&self, ws: &mut Workspace, n: usize) {
        let h = &self.layout.head;
        let inp = match self.layout.encoder.len() {
            0 => &ws.x[..n * h.in_dim],
            k => &ws.enc[k - 1][..n * h.in_dim],
        };
        let (w, b) = weights(&self.params, h);
        let head = &mut ws.head[..n * h.out_dim];
        linear_forward(head, inp, w, b, n, h.in_dim, h.out_dim, None);
    }

    /// Parts of rows for `latent_forward` and `latent_backward`, or 1 when they do not apply:
    /// one thread, or no hidden layer before the head or after z.
    fn latent_parts(&self, n: usize) -> usize {
        if self.layout.encoder.is_empty() || self.layout.decoder.len() < 2 {
            return 1;
        }
        rayon::current_num_threads().min(n / LATENT_MIN_ROWS).max(1)
    }

    /// The head, the reparameterization and the first decoder layer, by parts of rows in
    /// parallel, each part's products on one thread: their 2Z- and Z-wide sides are too narrow
    /// to split each product well, and a part's rows stay with its thread from the last
    /// encoder activations to the first decoder ones.
    fn latent_forward(&self, ws: &mut Workspace, n: usize, parts: usize) {
        let (zd, act, p) = (self.config.latent_dim, self.act(), &self.params);
        let (h, d0) = (&self.layout.head, &self.layout.decoder[0]);
        let ((wh, bh), (wd, bd)) = (weights(p, h), weights(p, d0));
        let rows = n.div_ceil(parts);
        let inp = &ws.enc[self.layout.encoder.len() - 1][..n * h.in_dim];
        let (head, z, kl) = (
            &mut ws.head[..n * 2 * zd],
            &mut ws.z[..n * zd],
            &mut ws.kl[..n],
        );
        let (eps, dec0) = (&ws.eps[..n * zd], &mut ws.dec[0][..n * d0.out_dim]);
        head.par_chunks_mut(rows * 2 * zd)
            .zip(z.par_chunks_mut(rows * zd))
            .zip(kl.par_chunks_mut(rows))
            .zip(dec0.par_chunks_mut(rows * d0.out_dim))
            .zip(inp.par_chunks(rows * h.in_dim))
            .zip(eps.par_chunks(rows * zd))
            .for_each(|(((((hc, zc), klc), dc), ic), ec)| {
                let r = klc.len();
                linear_forward_on(1, hc, ic, wh, bh, r, h.in_dim, h.out_dim, None);
                reparam_kl_forward(zc, klc, hc, ec, zd);
                linear_forward_on(1, dc, zc, wd, bd, r, zd, d0.out_dim, Some(act));
            });
    }

    /// The backward pass of `latent_forward`: from the gradient of the first decoder layer's
    /// activations (ws.ddec[0]) to that of the last encoder layer's (ws.denc), with the head's
    /// and the first decoder layer's weight gradients summed over the parts in part order.
    fn latent_backward(&self, grads: &mut [f32], ws: &mut Workspace, n: usize, parts: usize) {
        let (zd, act, p) = (self.config.latent_dim, self.act(), &self.params);
        let (h, d0) = (&self.layout.head, &self.layout.decoder[0]);
        let (wh, wd) = (weights(p, h).0, weights(p, d0).0);
        let (hd, h1) = (d0.out_dim, h.in_dim);
        let rows = n.div_ceil(parts);
        // The head's parameters, then the first decoder layer's, are one range.
        let span = h.weight.start..d0.bias.end;
        debug_assert_eq!(h.bias.end, d0.weight.start);
        let len = span.len();
        let count = n.div_ceil(rows);
        if ws.latent.len() < count * len {
            ws.latent.resize(count * len, 0.0);
        }
        let k = self.layout.encoder.len() - 1;
        let (inp, dinp) = (&ws.enc[k][..n * h1], &mut ws.denc[k][..n * h1]);
        let (dec0, ddec0) = (&ws.dec[0][..n * hd], &mut ws.ddec[0][..n * hd]);
        let (head, z, eps) = (&ws.head[..n * 2 * zd], &ws.z[..n * zd], &ws.eps[..n * zd]);
        let (dz, dhead) = (&mut ws.dz[..n * zd], &mut ws.dhead[..n * 2 * zd]);
        let part_grads = &mut ws.latent[..count * len];
        part_grads
            .par_chunks_mut(len)
            .zip(ddec0.par_chunks_mut(rows * hd))
            .zip(dec0.par_chunks(rows * hd))
            .zip(dz.par_chunks_mut(rows * zd))
            .zip(dhead.par_chunks_mut(rows * 2 * zd))
            .zip(head.par_chunks(rows * 2 * zd))
            .zip(eps.par_chunks(rows * zd))
            .zip(z.par_chunks(rows * zd))
            .zip(inp.par_chunks(rows * h1))
            .zip(dinp.par_chunks_mut(rows * h1))
            .for_each(
                |(((((((((g, dd), d), dzc), dhc), hc), ec), zc), ic), dic)| {
                    let r = ec.len() / zd;
                    let (gh, gd) = g.split_at_mut(h.bias.end - h.weight.start);
                    let (gh_w, gh_b) = gh.split_at_mut(h.weight.len());
                    let (gd_w, gd_b) = gd.split_at_mut(d0.weight.len());
                    let (normal, transposed) = (MatLayout::Normal, MatLayout::Transposed);
                    activation_backward_rows(dd, d, act);
                    matmul_on(1, dzc, dd, normal, wd, normal, r, hd, zd, None);
                    matmul_on(1, gd_w, dd, transposed, zc, normal, hd, r, zd, None);
                    bias_backward(gd_b, dd, r, hd);
                    reparam_kl_backward(dhc, dzc, hc, ec, zd);
                    matmul_on(1, dic, dhc, normal, wh, normal, r, 2 * zd, h1, None);
                    matmul_on(1, gh_w, dhc, transposed, ic, normal, 2 * zd, r, h1, None);
                    bias_backward(gh_b, dhc, r, 2 * zd);
                },
            );
        let out = &mut grads[span];
        let (first, rest) = part_grads.split_at(len);
        out.copy_from_slice(first);
        for part in rest.chunks_exact(len) {
            out.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
    }

    /// ws.head, ws.eps -> ws.z and ws.kl for the first n rows.
    pub fn reparameterize(&self, ws: &mut Workspace, n: usize) {
        let z = self.config.latent_dim;
        reparam_kl_forward(
            &mut ws.z[..n * z],
            &mut ws.kl[..n],
            &ws.head[..n * 2 * z],
            &ws.eps[..n * z],
            z,
        );
    }

    /// ws.z[..n] -> logits in ws.dec.last()[..n].
    pub fn decode_forward(&self, ws: &mut Workspace, n: usize) {
        self.decode_from(ws, n, 0);
    }

    /// The decoder from its layer `first` on, that layer's input in place.
    fn decode_from(&self, ws: &mut Workspace, n: usize, first: usize) {
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
            linear_forward(
                out,
                &prev[..n * l.in_dim],
                w,
                b,
                n,
                l.in_dim,
                l.out_dim,
                act,
            );
            prev = out;
            rest = tail;
        }
    }

    /// Full forward pass for n rows given ws.x and ws.eps; leaves logits in ws.dec.last().
    pub fn forward(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        self.encode_forward(ws, n, sparse);
        self.reparameterize(ws, n);
        self.decode_forward(ws, n);
    }

    /// The forward pass for training, ahead of `loss_backward`: as `forward`, with the latent
    /// block by parts of rows on several threads (`latent_forward`).
    pub fn forward_train(&self, ws: &mut Workspace, n: usize, sparse: bool) {
        let parts = self.latent_parts(n);
        if parts == 1 {
            return self.forward(ws, n, sparse);
        }
        self.encode_hidden(ws, n, sparse);
        self.latent_forward(ws, n, parts);
        self.decode_from(ws, n, 1);
    }

    /// Per-example -log p(x|z) into ws.bce; with `grad`, the logits become their gradient.
    pub fn reconstruction_loss(&self, ws: &mut Workspace, n: usize, grad: bool) {
        let d = self.config.input_dim;
        let logits = ws.dec.last_mut().expect("decoder has an output layer");
        bce_logits_forward_backward(
            &mut ws.bce[..n],
            &mut logits[..n * d],
            &ws.x[..n * d],
            d,
            grad,
        );
    }

    /// After `forward_train`: the loss summed over the n rows, and its gradient with respect
    /// to every parameter written into `grads` (laid out as the parameters).
    ///
    /// With `check_finite`, a non-finite loss is an error (before any gradient is computed).
    /// `first` says whether the first layer's weight gradient is computed or left to the caller.
    pub fn loss_backward(
        &self,
        grads: &mut [f32],
        ws: &mut Workspace,
        n: usize,
        check_finite: bool,
        first: FirstWeight,
    ) -> Result<f64, String> {
        debug_assert_eq!(grads.len(), self.params.len());
        self.reconstruction_loss(ws, n, true);
        let loss = ws.bce[..n].iter().sum::<f64>() + ws.kl[..n].iter().sum::<f64>();
        if check_finite && !loss.is_finite() {
            return Err(format!("the loss is {loss}"));
        }
        let act = self.act();
        let layout = &self.layout;
        let params = &self.params;
        // Decoder, last layer first. dout of layer j is the logits' gradient for the last
        // layer and ddec[j] (made pre-activation) for the others.
        let dec_layers = &layout.decoder;
        let parts = self.latent_parts(n);
        let latent = parts > 1;
        for j in (usize::from(latent)..dec_layers.len()).rev() {
            let l = &dec_layers[j];
            let (dw, db) = weight_grads(grads, l);
            let (w, _) = weights(params, l);
            let (dec_before, dec_from_j) = ws.dec.split_at_mut(j);
            let (ddec_before, ddec_from_j) = ws.ddec.split_at_mut(j);
            let dout: &[f32] = if j + 1 == dec_layers.len() {
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

        // The first decoder layer, z and the head; then the encoder from its last layer, the
        // first layer's input gradient never needed.
        let enc_layers = &layout.encoder;
        let d_in = self.config.input_dim;
        let h = &layout.head;
        if latent {
            self.latent_backward(grads, ws, n, parts);
        } else {
            let z = self.config.latent_dim;
            reparam_kl_backward(
                &mut ws.dhead[..n * 2 * z],
                &ws.dz[..n * z],
                &ws.head[..n * 2 * z],
                &ws.eps[..n * z],
                z,
            );
            let (dw, db) = weight_grads(grads, h);
            let (w, _) = weights(params, h);
            let (inp, dinp): (&[f32], Option<&mut [f32]>) = match enc_layers.len() {
                0 => (&ws.x[..n * d_in], None),
                k => (
                    &ws.enc[k - 1][..n * h.in_dim],
                    Some(&mut ws.denc[k - 1][..n * h.in_dim]),
                ),
            };
            let dout = &ws.dhead[..n * h.out_dim];
            linear_backward(dinp, dw, db, dout, inp, w, n, h.in_dim, h.out_dim);
        }
        for i in (0..enc_layers.len()).rev() {
            let l = &enc_layers[i];
            let (dw, db) = weight_grads(grads, l);
            let (w, _) = weights(params, l);
            let (denc_before, denc_from_i) = ws.denc.split_at_mut(i);
            let dout = &mut denc_from_i[0][..n * l.out_dim];
            activation_backward(dout, &ws.enc[i][..n * l.out_dim], l.out_dim, act);
            if l.transposed {
                // The first layer: no input gradient.
                bias_backward(db, dout, n, l.out_dim);
                if first == FirstWeight::Compute {
                    let (x, cols) = (&ws.x[..n * d_in], ws.cols.get());
                    first_weight_grad(dw, x, cols, dout, n, l.in_dim, l.out_dim);
                }
            } else {
                let (inp, dinp): (&[f32], Option<&mut [f32]>) = if i == 0 {
                    (&ws.x[..n * d_in], None)
                } else {
                    (
                        &ws.enc[i - 1][..n * l.in_dim],
                        Some(&mut denc_before[i - 1][..n * l.in_dim]),
                    )
                };
                linear_backward(dinp, dw, db, dout, inp, w, n, l.in_dim, l.out_dim);
            }
        }
        Ok(loss)
    }

    /// After `loss_backward(.., FirstWeight::Defer)`: the first layer's weight gradient into
    /// `grads`.
    pub fn first_layer_weight_grad(&self, grads: &mut [f32], ws: &Workspace, n: usize) {
        let l = &self.layout.encoder[0];
        debug_assert!(l.transposed);
        let (dw, _) = weight_grads(grads, l);
        let (x, cols) = (&ws.x[..n * l.in_dim], ws.cols.get());
        let dh = &ws.denc[0][..n * l.out_dim];
        first_weight_grad(dw, x, cols, dh, n, l.in_dim, l.out_dim);
    }
}

/// dwt (I, O) = x^T dh for the first layer, x (B, I) and dh (B, O): from the batch's nonzeros
/// when `cols` indexes them, else as a dense product.
fn first_weight_grad(
    dwt: &mut [f32],
    x: &[f32],
    cols: Option<&BatchColumns>,
    dh: &[f32],
    n: usize,
    i: usize,
    o: usize,
) {
    match cols {
        Some(cols) => first_layer_weight_grad(GradSink::Store(dwt), cols, dh, i, o),
        None => {
            let (lhs, rhs) = (MatLayout::Transposed, MatLayout::Normal);
            matmul(dwt, x, lhs, dh, rhs, i, n, o);
        }
    }
}
