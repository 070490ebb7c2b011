//! Opt-in wall-time breakdown of the transformer forward by named region (`flux_step --profile`).
//!
//! When enabled, each region synchronizes the device before and after it runs, so a region's time
//! is the device work it queued plus the host time to queue it, with no overlap between regions.
//! The synchronizations stall the launch queue, so a profiled step is slower than a plain one; the
//! breakdown shows where the time goes, the plain step time stays the number to compare. When
//! disabled (the default) a region is one branch around the closure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::error::{ModelError, Result};

/// Accumulated time of one region.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionTime {
    pub name: &'static str,
    pub total: Duration,
    pub calls: u64,
}

/// Per-region accumulators, in first-seen order.
#[derive(Debug, Default)]
pub struct Profiler {
    regions: Mutex<Vec<RegionTime>>,
}

impl Profiler {
    /// Runs `f` between two device synchronizations and adds its wall time to `name`.
    pub fn time<T>(
        &self,
        device: &Device,
        name: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        device.synchronize()?;
        let t = Instant::now();
        let out = f()?;
        device.synchronize()?;
        let dt = t.elapsed();
        let mut r = self.lock()?;
        match r.iter_mut().find(|x| x.name == name) {
            Some(x) => {
                x.total += dt;
                x.calls += 1;
            }
            None => r.push(RegionTime {
                name,
                total: dt,
                calls: 1,
            }),
        }
        Ok(out)
    }

    /// The accumulated regions; clears them.
    pub fn take(&self) -> Result<Vec<RegionTime>> {
        Ok(std::mem::take(&mut *self.lock()?))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<RegionTime>>> {
        self.regions
            .lock()
            .map_err(|_| ModelError::InvalidInput("profiler lock poisoned".into()))
    }
}

/// Runs `f` as region `name` of `p` when profiling, else just runs it.
pub fn region<T>(
    p: Option<&Profiler>,
    device: &Device,
    name: &'static str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    match p {
        Some(p) => p.time(device, name, f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_by_name_in_first_seen_order() -> Result<()> {
        let p = Profiler::default();
        let dev = Device::Cpu;
        for _ in 0..3 {
            region(Some(&p), &dev, "a", || Ok(()))?;
            region(Some(&p), &dev, "b", || Ok(()))?;
        }
        let v = region(None, &dev, "c", || Ok(7))?;
        assert_eq!(v, 7);
        let r = p.take()?;
        let names: Vec<_> = r.iter().map(|x| (x.name, x.calls)).collect();
        assert_eq!(names, [("a", 3), ("b", 3)]);
        assert!(p.take()?.is_empty());
        Ok(())
    }

    #[test]
    fn region_error_passes_through() {
        let p = Profiler::default();
        let r: Result<()> = region(Some(&p), &Device::Cpu, "x", || {
            Err(ModelError::InvalidInput("boom".into()))
        });
        assert!(r.is_err());
    }
}
