"""counterwarp.nn"""
