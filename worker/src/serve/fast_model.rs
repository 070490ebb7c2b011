//! A stand-in for the models, for scale tests of the system around them: with
//! `PAWFECT_TEST_FAST_MODEL=1`, `serve` loads no model and fills the masked pixels with one
//! colour derived from the job's seed (one progress report per step, no sleeping), so thousands
//! of jobs run through the real queue, storage, status and scaling paths in minutes on a CPU.
//! Every other stage (fetch, mask cleanup, crop, stitch, store) runs as it does for real jobs.
//!
//! Only in `test-faults` builds, and refused by optimized ones (`cli/serve.rs`): no release
//! binary can answer a job with this.

use image::{GrayImage, Rgb, RgbImage};

use crate::pipeline::{InpaintError, InpaintParams, Inpainted, Inpainter, ModelTimings, Step};

/// The environment variable that selects it.
pub const ENV: &str = super::TEST_FAST_MODEL_ENV;

/// Fills the mask with the colour of the seed.
pub struct FastInpainter;

/// The colour of a seed: its three low bytes.
pub fn colour(seed: u64) -> Rgb<u8> {
    Rgb([seed as u8, (seed >> 8) as u8, (seed >> 16) as u8])
}

impl Inpainter for FastInpainter {
    fn inpaint(
        &self,
        image: &RgbImage,
        mask: &GrayImage,
        _prompt: &str,
        params: &InpaintParams,
        progress: &mut dyn FnMut(Step) -> bool,
    ) -> Result<Inpainted, InpaintError> {
        if image.dimensions() != mask.dimensions() {
            return Err(InpaintError::InvalidInput(format!(
                "image is {:?} but mask is {:?}",
                image.dimensions(),
                mask.dimensions()
            )));
        }
        for step in 1..=params.steps {
            if !progress(Step {
                step,
                total: params.steps,
            }) {
                return Err(InpaintError::Cancelled);
            }
        }
        let fill = colour(params.seed);
        let mut out = image.clone();
        for (p, m) in out.pixels_mut().zip(mask.pixels()) {
            if m.0[0] >= 128 {
                *p = fill;
            }
        }
        Ok(Inpainted {
            image: out,
            timings: ModelTimings::default(),
            work: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Luma;

    #[test]
    fn fills_only_the_mask_with_the_seed_colour_and_reports_every_step() {
        let image = RgbImage::from_pixel(4, 2, Rgb([1, 2, 3]));
        let mut mask = GrayImage::new(4, 2);
        mask.put_pixel(1, 0, Luma([255]));
        let mut steps = Vec::new();
        let params = InpaintParams {
            steps: 3,
            guidance: 30.0,
            seed: 0x0A0B0C,
            cache_threshold: None,
        };
        let out = FastInpainter
            .inpaint(&image, &mask, "", &params, &mut |s| {
                steps.push(s.step);
                true
            })
            .unwrap();
        assert_eq!(steps, vec![1, 2, 3]);
        assert_eq!(*out.image.get_pixel(1, 0), Rgb([0x0C, 0x0B, 0x0A]));
        assert_eq!(*out.image.get_pixel(0, 0), Rgb([1, 2, 3]));
        let cancelled = FastInpainter.inpaint(&image, &mask, "", &params, &mut |_| false);
        assert!(matches!(cancelled, Err(InpaintError::Cancelled)));
    }
}
