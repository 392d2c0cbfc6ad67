"""The Streamlit dashboard: ``python -m streamlit run dashboard/app.py``."""
