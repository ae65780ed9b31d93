"""pocketGPT: train your own small GPT from scratch, in four notebooks. The package behind them.

pocketgpt_utils.py (beside this folder) is the notebooks' one import and the command line; its docstring
is the table of these modules. Importing the package imports nothing heavy: each module imports what it
needs when it is imported.
"""
