"""Reports: the HTML pages of a run, of a cross-validation and of compared runs, and their figures.

    report.py    a run's report.html       cv.py       a cross-validation's page
    figures.py   the figures (matplotlib)  compare.py  runs side by side
    html.py      the page itself: sections, tables, escaped text, figure files
"""
