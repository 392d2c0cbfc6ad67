"""Entry point of the dashboard: ``python -m streamlit run dashboard/app.py``.

Sets up the page and routes to the pages in ``dashboard/app_pages/`` with ``st.navigation``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `import captioning` without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import streamlit as st  # noqa: E402

PAGES_DIR = Path(__file__).resolve().parent / "app_pages"

st.set_page_config(page_title="Captioning", page_icon="🖼️", layout="wide")

pages = [
    st.Page(PAGES_DIR / "caption.py", title="Caption", icon=":material/image:", default=True),
    st.Page(PAGES_DIR / "compare.py", title="Compare", icon=":material/view_column:"),
    st.Page(PAGES_DIR / "training.py", title="Training", icon=":material/show_chart:"),
    st.Page(PAGES_DIR / "explore.py", title="Explore", icon=":material/table_view:"),
    st.Page(PAGES_DIR / "batch.py", title="Batch", icon=":material/photo_library:"),
]
st.navigation(pages, position="top").run()
