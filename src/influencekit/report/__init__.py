"""The report: ``results.json`` → a self-contained ``index.html`` with figures and tables."""
