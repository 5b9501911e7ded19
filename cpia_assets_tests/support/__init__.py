"""Helpers the tests share: real HTTP servers, slide and workbook factories, small disks,
process control, SSL data, and where the shared test data lives."""
