//! What the benches' SVG figures share. plotters with its SVG backend only:
//! text is SVG `<text>` that the viewer renders, so no font library is
//! linked; layout uses plotters' built-in size estimate.

use anyhow::{anyhow, Result};
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;

pub const SIZE: (u32, u32) = (800, 500);
pub const FONT: &str = "sans-serif";

pub fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// Draws the legend (upper left, boxed) and writes the figure out.
pub fn finish<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    root: &DrawingArea<DB, Shift>,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
