"""counterwarp.train"""
