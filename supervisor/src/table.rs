//! Text tables aligned like BSD `column -t`, which vm-bhyve pipes its listings through:
//! each column but the last is padded to its widest cell plus two spaces.

#![forbid(unsafe_code)]

/// Renders `rows` (the first is the header) as aligned lines, each ending in `\n`.
/// An empty cell is shown as `-`, since `column -t` would collapse it.
pub fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell_text(cell).chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let text = cell_text(cell);
            line.push_str(text);
            if i.saturating_add(1) < row.len() {
                let width = widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(text.chars().count()).saturating_add(2);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn cell_text(cell: &str) -> &str {
    if cell.is_empty() { "-" } else { cell }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|&c| c.to_owned()).collect()
    }

    #[test]
    fn columns_align_with_two_spaces() {
        let out = render(&[
            row(&["NAME", "CPU", "STATE"]),
            row(&["longname", "4", "Stopped"]),
        ]);
        assert_eq!(out, "NAME      CPU  STATE\nlongname  4    Stopped\n");
    }

    #[test]
    fn empty_cells_show_a_dash() {
        let out = render(&[row(&["A", "B"]), row(&["", "x"])]);
        assert_eq!(out, "A  B\n-  x\n");
    }

    #[test]
    fn no_rows_is_empty() {
        assert_eq!(render(&[]), "");
    }
}
