//! The pictures of the VNC benchmark (`bench_vnc`), shared with the device-level test that
//! holds dev-fb's bytes on the wire to QEMU's figures for them (`tests/tests/dev_fb.rs`):
//! 1600×900, vertical stripes of 16 colours in 8-row bands, one solid colour, and a small box
//! on it. Colours are `[r, g, b]`.

/// The screen: 1600×900.
pub const SIZE: (u32, u32) = (1600, 900);
/// The solid screen's colour.
pub const SOLID: [u8; 3] = [0x20, 0xc0, 0x60];
/// The small change's colour.
pub const SMALL_COLOUR: [u8; 3] = [0xe0, 0x30, 0x10];
/// The small change: a 64×16 box at (101, 203), as (x, y, w, h).
pub const SMALL: (u32, u32, u32, u32) = (101, 203, 64, 16);
/// 16 colours of the stripes.
pub const PALETTE: [[u8; 3]; 16] = [
    [0, 0, 0],
    [170, 0, 0],
    [0, 170, 0],
    [170, 85, 0],
    [0, 0, 170],
    [170, 0, 170],
    [0, 170, 170],
    [170, 170, 170],
    [85, 85, 85],
    [255, 85, 85],
    [85, 255, 85],
    [255, 255, 85],
    [85, 85, 255],
    [255, 85, 255],
    [85, 255, 255],
    [255, 255, 255],
];
/// Stripe widths, cycled across a row.
pub const WIDTHS: [u32; 8] = [37, 100, 61, 13, 89, 50, 150, 25];

/// One row of the stripes as runs of (colour, width): colour k (or k + 5 in odd 8-row bands)
/// of the palette for the k-th run of [`WIDTHS`].
pub fn stripe_runs(odd_band: bool) -> Vec<([u8; 3], u32)> {
    let mut runs = Vec::new();
    let mut x = 0;
    for k in 0usize.. {
        if x >= SIZE.0 {
            break;
        }
        let w = WIDTHS[k % WIDTHS.len()].min(SIZE.0 - x);
        let colour = PALETTE[(k + if odd_band { 5 } else { 0 }) % PALETTE.len()];
        runs.push((colour, w));
        x += w;
    }
    runs
}

/// The stripes' colour at (x, y).
pub fn stripe_colour(x: u32, y: u32) -> [u8; 3] {
    let mut start = 0;
    for (colour, w) in stripe_runs(y / 8 % 2 == 1) {
        if x < start + w {
            return colour;
        }
        start += w;
    }
    [0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_each_row_exactly_and_bands_differ() {
        for odd in [false, true] {
            let total: u32 = stripe_runs(odd).iter().map(|&(_, w)| w).sum();
            assert_eq!(total, SIZE.0);
        }
        assert_eq!(stripe_colour(0, 0), PALETTE[0]);
        assert_eq!(stripe_colour(0, 8), PALETTE[5]);
        assert_eq!(stripe_colour(37, 0), PALETTE[1]);
    }
}
