"""What each way of moving image bytes costs in CPU, measured alone (python -m bench.datapaths)."""
