"""The report of a results file: markdown tables and the report files (`markdown`), the
same report as one HTML page (`html`), how one value is written (`cells`), the figures'
common parts (`figures`), and the horizon and success sections (`horizons`, `success`)."""
